"""The ingress: an aiohttp proxy that forwards calls unchanged and publishes events."""
