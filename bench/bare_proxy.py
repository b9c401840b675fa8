"""A bare aiohttp pass-through proxy: the floor for a Python proxy on this machine.

    python bench/bare_proxy.py --port 9002 --upstream http://127.0.0.1:9001

Reads the request, forwards it with one shared ClientSession (configured like the
ingress's), and streams the answer back chunk by chunk as it arrives. Nothing else:
no parsing, no auth, no events, no metrics. Only hop-by-hop headers are dropped.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

# The same set the ingress drops (RFC 9110 hop-by-hop, plus what aiohttp recomputes).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
    }
)

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        app[SESSION] = session
        yield


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    url = request.app[UPSTREAM] + request.path_qs
    async with request.app[SESSION].request(
        request.method, url, data=body, headers=headers
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def app(upstream: str) -> web.Application:
    application = web.Application(client_max_size=32 * 1024 * 1024)
    application[UPSTREAM] = upstream.rstrip("/")
    application.cleanup_ctx.append(client_session)
    application.router.add_route("*", "/{tail:.*}", forward)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001")
    args = parser.parse_args()
    web.run_app(app(args.upstream), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
