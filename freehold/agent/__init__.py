"""The agent runtime: a tool loop with budgets, error feedback and traces, over an in-process LLM or any
OpenAI-compatible server (`loop.Agent`); tools from typed Python functions (`functions`); built-in tools
(`builtin`)."""
from freehold.agent.events import Event, ModelTurn, RunFinished, RunStarted, ToolResult
from freehold.agent.functions import FunctionTool, ToolArgumentError, client_tool, function_tool
from freehold.agent.limits import Limits, StopReason
from freehold.agent.loop import Agent, RunResult
from freehold.agent.models import ChatModel, LocalModel, ModelError, RemoteModel, TurnResult

__all__ = ["Agent", "RunResult", "Limits", "StopReason", "FunctionTool", "ToolArgumentError", "function_tool",
           "client_tool", "ChatModel", "LocalModel", "RemoteModel", "ModelError", "TurnResult", "Event",
           "RunStarted", "ModelTurn", "ToolResult", "RunFinished"]
