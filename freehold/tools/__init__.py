"""Tool calls (OpenAI `tools` / `tool_choice`): the request (`spec`), the prompt (`prompt`), the constraint that
makes every call well-formed (`grammar`), and reading the calls back out of the text (`parse`)."""
