"""The worker's stages: the cost stage (with its windows and budgets steps) and the
spikes stage, each reading its topic with a consumer of its own (stage.py). Each
stays small; the math lives in plain modules beside them."""
