"""`cnnlab serve MODEL`: the drawing page and JSON API on a local threaded server."""
from __future__ import annotations

import errno
import signal
import socket
import sys

EPILOG = """examples:
  cnnlab serve runs/demo                      # http://127.0.0.1:8000/
  cnnlab serve runs/demo --port 8080 --engine torch
  curl -F file=@digit.png http://127.0.0.1:8000/api/predict

The page: draw a digit (mouse, touch or pen) or upload an image; see the class
probabilities, the input as the model sees it, every layer's feature maps and the
model card. The server listens on 127.0.0.1 only unless --host says otherwise."""


def add_parser(sub, fmt):
    p = sub.add_parser("serve", help="web page: draw or upload an image, see the prediction "
                                     "and every layer", epilog=EPILOG, formatter_class=fmt,
                       description="Serve a model: a page to draw on and a JSON API "
                                   "(/api/predict, /api/activations, /api/model, /healthz).")
    p.add_argument("model", help="model file or run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--engine", choices=["numpy", "torch"], default="numpy",
                   help="engine to run the model with (default numpy: no PyTorch needed)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def listen(host, port) -> socket.socket:
    """A listening TCP socket (a long queue: many clients may connect at once)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _stop(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    try:
        import flask  # noqa: F401
    except ImportError:
        print("error: cnnlab serve needs Flask: pip install 'cnnlab[serve]'", file=sys.stderr)
        return 1
    import logging

    from werkzeug.serving import make_server

    from .app import create_app
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port}: must be between 0 and 65535", file=sys.stderr)
        return 2
    app = create_app(args.model, engine=args.engine)
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(f"error: port {args.port} is in use; try --port {args.port + 1}",
                  file=sys.stderr)
        else:
            print(f"error: cannot listen on {args.host}:{args.port}: "
                  f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    with sock:
        server = make_server(args.host, sock.getsockname()[1], app, threaded=True,
                             fd=sock.fileno())
    clf = app.extensions["cnnlab_classifier"]
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {clf.model.name} ({clf.engine.name} engine) at "
          f"http://{shown}:{port}/   (Ctrl-C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("note: reachable from other machines; this is a development server without "
              "authentication", flush=True)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()  # returns on Ctrl-C (werkzeug catches it) or SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    print("\nstopped", flush=True)
    return 0
