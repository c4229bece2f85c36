"""The chat page `freehold serve` shows at `/` (off with --no-ui): static files in `static/`, served by `page`."""
