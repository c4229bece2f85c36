"""What bounds a run (`Limits`) and how a run ended (`StopReason`). Every limit ends the run cleanly: the loop checks
it before the work it bounds, so no limit is passed by more than the one model turn or tool call in flight."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class StopReason(enum.Enum):
    ANSWER = "answer"  # a model turn made no tool call: its text is the answer
    MAX_STEPS = "max_steps"  # max_steps model turns were taken and the last one still called tools
    BUDGET = "budget"  # max_tool_calls, max_total_tokens or max_output_tokens would be passed
    TIMEOUT = "timeout"  # max_seconds of wall clock passed
    LOOP_DETECTED = "loop_detected"  # the same call (name and arguments) asked for once more than max_repeats
    ERROR = "error"  # the model could not be asked (server down, prompt over the context, ...): `detail` says why
    CLIENT_TOOLS = "client_tools"  # a call to a tool the loop does not run (no function): handed back to the caller


@dataclass(frozen=True)
class Limits:
    max_steps: int = 8  # model turns
    max_tool_calls: int = 16  # tool executions over the run
    # prompt + completion tokens summed over the turns. Before each turn the loop counts the next prompt as at least
    # the last prompt plus its reply (a lower bound: tool results come on top) and gives the turn only what is left,
    # so the run may pass this by the size of the last turn's new tool results and template tokens, no more.
    max_total_tokens: int | None = None
    max_output_tokens: int | None = None  # completion tokens summed over the turns
    max_turn_tokens: int = 512  # max_tokens of one model turn
    max_seconds: float = 300.0  # wall clock of the whole run
    tool_timeout: float = 30.0  # one tool call, unless the tool sets its own
    max_repeats: int = 2  # identical calls allowed (a retry after an error is one); one more is loop_detected
    max_result_chars: int = 4000  # a tool's result or error is cut to this before the model sees it

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tool_calls", "max_turn_tokens", "max_repeats", "max_result_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_total_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Limits.{name} must be at least 1 (or None for no limit), got {value}")
        for name in ("max_seconds", "tool_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return asdict(self)
