"""The stream: the worker that turns call events into money, aggregates and alerts (its
cost stage and the Faust app around it)."""
