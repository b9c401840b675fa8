"""The stream: Faust agents that turn call events into money, aggregates and alerts."""
