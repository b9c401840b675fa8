"""The worker's stages: the cost stage (with its windows and budgets steps) and the
Faust spikes agent. Each stays small; the math lives in plain modules beside them."""
