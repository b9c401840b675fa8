"""Faust agents. Each stays small; the math lives in plain modules beside them."""
