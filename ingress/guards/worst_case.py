"""A call's worst case: the most it can cost, from its request alone, before any token
is spent. What a hard cap reserves when it admits a call (ingress/guards/budgets.py).

Every byte of the request body as an input token (a token is never shorter than a
byte), at most the model's context window a prompt, or, when the body does not hold
all the input (ingress/guards/bounds.py), at least ``default_context_tokens``; plus
``max_tokens`` output tokens (or, when the call names none, the most the model
writes), each token at the dearest rate it may be billed at; plus the fee of the most
web searches its tools allow, and what an advisor tool may spend. The pricing catalog
gives each model's limits and prices.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from ingress.guards.bounds import Advisor
from stream.catalog import Catalog, Rates
from stream.pricing import PER_MILLION, search_fee


def geo_times(rates: Rates, geo: str | None) -> Decimal:
    """What a worst case's token rates are multiplied by for a call asking to run its
    inference in ``geo`` (Anthropic's ``inference_geo``): that geography's multiplier
    (``"global"``: 1); when it names none, its workspace's ``default_inference_geo``
    decides, which llmtap cannot see, so the dearest geography the price names (a worst
    case covers what the call can be billed); one the price does not name cannot be
    bounded, so the dearest too (a call run there is held as unpriced:
    budgets.BudgetBook.settle)."""
    times = rates.geo(geo) if geo is not None else None
    return rates.dearest_geo() if times is None else times


@dataclass(frozen=True)
class WorstCase:
    """The worst cases of calls, at the catalog's prices, with the settings'
    stand-ins for what a call or the catalog does not bound."""

    catalog: Catalog
    default_max_tokens: int  # the output of a model the catalog gives no limit for
    # The input of a call whose body does not hold it all (ingress/guards/bounds.py).
    default_context_tokens: int = 1_000_000
    # The searches of a call whose web search tool names no max_uses/max_tool_calls.
    default_web_searches: int = 100
    image_tokens: int = 50_000  # the most input tokens one image counts (bounds.images)
    # The calls of an advisor tool that names no max_uses (advisor_cost).
    default_advisor_uses: int = 100

    def cost(
        self,
        model: str,
        request_bytes: int,
        max_tokens: int | None,
        now: datetime,
        provider: str = "",
        choices: int = 1,
        input_unbounded: bool = False,
        prompts: int = 1,
        web_searches: int | None = 0,
        images: int = 0,
        preview_named: bool = False,
        fast: bool = False,
        advisor: Advisor | None = None,
        geo: str | None = None,
        priority: bool = False,
        ultrafast: bool = False,
    ) -> Decimal | None:
        """The most the call can cost. Its input: the body's bytes, at most the model's
        context window for each of the ``prompts`` the provider answers apart (a list of
        prompts to the completions API, of inputs to the embeddings API); when the body
        does not hold all of it (``input_unbounded``), at least ``default_context_tokens``
        and a window a prompt (tools the provider runs read their results each round).
        Its output: ``max_tokens`` for each of ``choices`` answers (OpenAI's ``n``) to
        each prompt, or the model's most tokens an answer when the call names none. And
        the fee of ``web_searches`` (None: not bounded, ``default_web_searches``), at the
        dearer of the two search fees when the call names the ``web_search_preview``
        tool (``preview_named``: which tool ran a search cannot be told). The
        catalog gives both limits (``context_window``, ``max_output_tokens``); for a
        model it gives none for, ``default_context_tokens`` and ``default_max_tokens``
        stand in. Each of ``images`` adds ``image_tokens`` of input (its tokens are the
        provider's count of its pixels, not its bytes). A call that asks for Anthropic's
        fast mode (``fast``) has its tokens at the fast rates (its price's
        ``fast_multiplier`` times the standard ones), where the catalog gives them; for
        a model it gives none for, Anthropic refuses fast mode, and the standard rates
        stand (a call served fast all the same is held so: budgets.BudgetBook.settle). Its tokens
        are times the multiplier of the geography it asks its inference to run in
        (``geo``, Anthropic's ``inference_geo``: ``"global"`` 1, ``"us"`` 1.1 on Claude
        4.6 and later); asking for none (its workspace's default decides, unseen here)
        or for one the price does not name, the dearest the price names
        (:func:`geo_times`). A call OpenAI may serve at its priority tier (``priority``:
        bounds.priority) has each token at the dearer of the standard rate and the
        priority one, where the catalog gives priority rates (OpenAI serves a prompt past
        128K tokens at the standard tier, long-context rates included); for a model it
        gives none for, the standard rates stand (a call served at priority all the same
        is held so: budgets.BudgetBook.settle). So for a call asking for OpenAI's
        ultrafast tier (``ultrafast``: bounds.ultrafast), at its rates."""
        entry = self.catalog.lookup(model, provider)
        rates = entry[1].at(now) if entry is not None else None
        if entry is None or rates is None:
            return None
        window, most = entry[1].context_window, entry[1].max_output_tokens
        # An upper bound: no more prompt tokens than bytes, each at the dearest prompt
        # rate (a cache write costs more than input), the long-context tier if the
        # prompt could pass its threshold, and every output token at the dearer of the
        # output and reasoning rates.
        prompts = max(prompts, 1)
        prompt = request_bytes + images * self.image_tokens
        if input_unbounded:
            # Not one window: a provider running tools reads each round's results again
            # (a window each round), so such a call keeps the default context at least.
            prompt = max(prompt, self.default_context_tokens, (window or 0) * prompts)
        elif window is not None:
            prompt = min(prompt, window * prompts)
        input_rate, output_rate = rates.for_prompt(prompt).dearest()
        if fast and rates.fast_multiplier is not None:
            input_rate *= rates.fast_multiplier
            output_rate *= rates.fast_multiplier
        asked = (rates.priority if priority else None, rates.ultrafast if ultrafast else None)
        for dearer in (tier for tier in asked if tier is not None):
            # The tier's own dearest: its cache writes too, which the stream bills at
            # the tier's rate (GPT-5.6 on: 1.25x input; left out, a cap fell ~25% short).
            tier_input, tier_output = dearer.dearest()
            input_rate = max(input_rate, tier_input, dearer.cached_input or Decimal(0))
            output_rate = max(output_rate, tier_output)
        times = geo_times(rates, geo)
        input_rate, output_rate = input_rate * times, output_rate * times
        # A max_tokens the call names is reserved in full (a catalog limit may be low).
        if max_tokens is not None:
            each = max_tokens
        else:
            each = most if most is not None else self.default_max_tokens
        output = each * max(choices, 1) * prompts
        searches = self.default_web_searches if web_searches is None else web_searches
        tokens = (prompt * input_rate + output * output_rate) / PER_MILLION
        fee = search_fee(searches, rates)
        if preview_named:
            fee = max(fee, search_fee(searches, rates, preview=searches))
        if advisor is not None:
            # An advisor model with no price cannot be bounded: the executor's worst case
            # is reserved all the same, and held until the period ends (settle), as the
            # stream cannot price the call.
            advice = self.advisor_cost(advisor, request_bytes, images, now, provider, geo)
            return tokens + fee + (advice or Decimal(0))
        return tokens + fee

    def advisor_cost(
        self,
        advisor: Advisor,
        request_bytes: int,
        images: int,
        now: datetime,
        provider: str = "",
        geo: str | None = None,
    ) -> Decimal | None:
        """The most a call's advisor tool (Anthropic's ``advisor_20260301``) can cost, at
        its model's prices (None: it has none): ``max_uses`` calls (when it names none,
        ``default_advisor_uses``), each reading the whole transcript, an input bounded
        as a provider-run tool's is (at least ``default_context_tokens`` and the
        advisor's context window), and writing its ``max_tokens`` (else the advisor
        model's most, else ``default_max_tokens``), each token at the dearest rate as in
        :meth:`cost`, in the call's geography (``geo``) as there. The call's own
        ``max_tokens`` does not bound the advisor."""
        entry = self.catalog.lookup(advisor.model, provider)
        rates = entry[1].at(now) if entry is not None else None
        if entry is None or rates is None:
            return None
        window, most = entry[1].context_window, entry[1].max_output_tokens
        uses = self.default_advisor_uses if advisor.max_uses is None else advisor.max_uses
        prompt = max(
            request_bytes + images * self.image_tokens, self.default_context_tokens, window or 0
        )
        if advisor.max_tokens is not None:
            each = advisor.max_tokens
        else:
            each = most if most is not None else self.default_max_tokens
        input_rate, output_rate = rates.for_prompt(prompt).dearest()
        times = geo_times(rates, geo)
        return uses * (prompt * input_rate + each * output_rate) * times / PER_MILLION
