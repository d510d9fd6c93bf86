"""Texts and conversations that tokenizer and chat-template tests compare against transformers."""

TEXTS = [
    "The capital of France is",
    "Hello world 2018-01-22 12345 3.14159",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "héllo wörld — 日本語のテキスト 🤖🚀 naïve café",
    "it's we'll I'M you'd THEY'RE",
    "def f(x):\n    return x**2  # square\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
]
