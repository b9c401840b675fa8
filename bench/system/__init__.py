"""The system benchmark (bench/run.py), one module per job:

- mix: the request mix, the keys it uses, pricing what was sent;
- processes: process trees, CPU accounting, the load-average wait, CLI/HTTP helpers;
- targets: starting and stopping what is measured (fake upstream, bare proxy, llmtap,
  LiteLLM);
- measure: one load generator run against one target, rounds, llmtap's ledger;
- llmtap_checks: llmtap only: freshness, budget enforcement, accounting;
- report: the summary over rounds, the verdicts, the markdown report.

Imported as ``system`` with bench/ first on sys.path (as when bench/run.py runs as a
script), like the sibling scripts it uses (fake_upstream, ingress_latency, loadgen)."""
