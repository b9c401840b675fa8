"""The dashboard: GET /dashboard, a server-rendered page over the analytics queries.

Pages are Jinja2 templates (templates/), charts inline SVG drawn on the server
(charts.py), styled by one shipped stylesheet (static/): no script, and nothing from
another host, so it works with no internet access. A person logs in with the same key
the API takes, and sees what that key sees (sessions.py).
"""

from sql.dashboard.views import add_routes

__all__ = ["add_routes"]
