"""What every llmtap stage shares: the event contract, topic names, config and the CLI."""
