"""`freehold eval agent`: the agent loop on a shipped task set (arithmetic that needs `calculator`, look-ups that
need `file_search` over the pydoc topics, tools that fail, hang or are misdocumented), with tools and without,
reported per category (tasks.py: the task set; faults.py: the faulty tools; scoring.py: answers and recovery;
pydoc_store.py: the look-up store; run.py: runs, report rows, targets)."""
from freehold.agent.evaluation.run import (DEFAULT_LIMITS, HEADERS, Mode, Outcome, Summary, Target, check_targets,
                                           evaluate, run_task, summarize)
from freehold.agent.evaluation.tasks import Category, Resources, Task, all_tasks, select

__all__ = ["DEFAULT_LIMITS", "HEADERS", "Mode", "Outcome", "Summary", "Target", "check_targets", "evaluate",
           "run_task", "summarize", "Category", "Resources", "Task", "all_tasks", "select"]
