"""Typed keys for everything the ingress app holds."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from ingress.forward.tokens import Counting
from ingress.guards.budgets import BudgetBook
from ingress.guards.key_store import KeyStore
from ingress.guards.ratelimit import RateLimiter
from ingress.metrics import IngressMetrics
from ingress.publisher import EventPublisher
from llmtap.config import Settings

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
# A connection of its own for each call: a call's one resend after a provider closed the
# kept-alive connection it was sent on (ingress/forward/resend.py).
UPSTREAM_FRESH = web.AppKey("upstream_fresh", aiohttp.ClientSession)
PUBLISHER = web.AppKey("publisher", EventPublisher)
KEYS = web.AppKey("keys", KeyStore)
METRICS = web.AppKey("metrics", IngressMetrics)
LIMITER = web.AppKey("limiter", RateLimiter)
BUDGETS = web.AppKey("budgets", BudgetBook)
COUNTING = web.AppKey("counting", Counting)  # output tokens of broken-off streams
# Set when the shutdown grace has run out: calls still running are cut by the proxy.
GRACE_OVER = web.AppKey("grace_over", asyncio.Event)
# Set by a SIGTERM while shutdown_delay_s runs: /readyz answers 503, calls are still taken.
STOPPING = web.AppKey("stopping", asyncio.Event)
