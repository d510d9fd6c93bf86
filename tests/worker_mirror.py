"""A worker's copy of the requests (xllm/worker/state.py) driven by scheduler outputs in a test:
what the ranks would hold and run, from the values the scheduler sends."""

from xllm.worker.state import RequestStates


class Mirror:
    def __init__(self):
        self.states = RequestStates()

    def items(self, out):
        """Take in a step as a worker does (release the freed, apply the rest): its RunItems."""
        self.states.release(out.freed_ids, {i.request_id for i in out.scheduled if i.new is not None})
        return self.states.apply(out).items

    def record(self, result):
        self.states.record(result.sampled_token_ids)
        return result
