"""An ASGI app (serve/api.py's) served by uvicorn in a thread on a free 127.0.0.1 port, for tests."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


@contextmanager
def serving(app, start_timeout_s: float = 30.0):
    """Yields the base URL (http://127.0.0.1:<port>) while uvicorn serves `app`; stops it on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start within {start_timeout_s:.0f} s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()
