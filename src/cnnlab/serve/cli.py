"""`cnnlab serve MODEL`: the drawing page and JSON API on waitress (see server.py)."""
from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import sys

EPILOG = """examples:
  cnnlab serve runs/demo                      # http://127.0.0.1:8000/
  cnnlab serve runs/demo --port 8080 --engine torch
  cnnlab serve runs/demo --host 0.0.0.0       # also from other machines (no authentication)
  curl -F file=@digit.png http://127.0.0.1:8000/api/predict

The page: draw a digit (mouse, touch or pen) or upload an image; see the class
probabilities, the input as the model sees it, every layer's feature maps and the
model card. The server listens on 127.0.0.1 only unless --host says otherwise."""


def add_parser(sub, fmt):
    from .app import CONNECTIONS, THREADS, TIMEOUT
    p = sub.add_parser("serve", help="web page: draw or upload an image, see the prediction "
                                     "and every layer", epilog=EPILOG, formatter_class=fmt,
                       description="Serve a model: a page to draw on and a JSON API "
                                   "(/api/predict, /api/activations, /api/model, /healthz).")
    p.add_argument("model", help="model file or run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 or ::: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--engine", choices=["numpy", "torch"], default="numpy",
                   help="engine to run the model with (default numpy: no PyTorch needed)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"requests run at once; the rest wait in a queue (default {THREADS})")
    p.add_argument("--max-connections", type=int, default=CONNECTIONS,
                   help="open connections at most; more wait to be accepted "
                        f"(default {CONNECTIONS})")
    p.add_argument("--timeout", type=float, default=TIMEOUT,
                   help="seconds a request may take to arrive, and a connection may stay "
                        f"idle (default {TIMEOUT:g})")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def listen(host, port) -> socket.socket:
    """A listening TCP socket (IPv6 '::' also takes IPv4 where the system allows)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if family == socket.AF_INET6 and ipaddress.ip_address(addr[0]).is_unspecified:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (OSError, AttributeError):
                pass
        if sys.platform != "win32":  # on Windows it would let another process take the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _ip(text):
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def is_local(address) -> bool:
    """True for loopback addresses: all of 127.0.0.0/8, and ::1."""
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def machine_addresses(ipv6=False) -> list:
    """This machine's addresses that other machines may reach (no loopback, no link-local)."""
    found = []
    families = [socket.AF_INET] + ([socket.AF_INET6] if ipv6 else [])
    for family in families:
        try:
            found += [i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None, family,
                                                          socket.SOCK_STREAM)]
        except OSError:
            pass
        # the address of the interface with the default route (a UDP "connect" sends nothing)
        probe = "192.0.2.1" if family == socket.AF_INET else "2001:db8::1"
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.append(s.getsockname()[0])
        except OSError:
            pass
    out = []
    for a in found:
        ip = _ip(a)
        if ip is not None and not (ip.is_loopback or ip.is_link_local or ip.is_unspecified) \
                and str(ip) not in out:
            out.append(str(ip))
    return out


def urls(host, bound_host, port) -> list:
    """[(url, note)] to open in a browser for a server listening on bound_host."""
    def url(a):
        return f"http://[{a}]:{port}/" if ":" in a else f"http://{a}:{port}/"
    ip = _ip(bound_host)
    if ip is not None and ip.is_unspecified:
        ipv6 = ":" in bound_host
        out = [(url("127.0.0.1"), "this machine")]
        if ipv6:
            out.append((url("::1"), "this machine"))
        out += [(url(a), "other machines") for a in machine_addresses(ipv6)]
        return out
    shown = host if host and not _ip(host) and host != bound_host else bound_host
    return [(url(shown), "this machine" if is_local(bound_host) else "")]


def _stop(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    try:
        import waitress  # noqa: F401
        import werkzeug  # noqa: F401
    except ImportError:
        print("error: cnnlab serve needs waitress and Werkzeug: pip install 'cnnlab[serve]'",
              file=sys.stderr)
        return 1
    import logging

    from .app import create_app
    from .server import Server, fixed_mmap_threshold
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port}: must be between 0 and 65535", file=sys.stderr)
        return 2
    for name, value, low in (("--threads", args.threads, 1),
                             ("--max-connections", args.max_connections, 1),
                             ("--timeout", args.timeout, 1)):
        if not value >= low:
            print(f"error: {name} {value:g}: must be at least {low}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    fixed_mmap_threshold()
    app = create_app(args.model, engine=args.engine, access_log=args.verbose)
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
    server = Server(app, sock, timeout=args.timeout, threads=args.threads,
                    connections=args.max_connections, quiet=not args.verbose)
    clf = app.classifier
    bound, port = sock.getsockname()[:2]
    shown = urls(args.host, bound, port)
    print(f"Serving {clf.model.name} ({clf.engine.name} engine) at "
          f"{shown[0][0]}   (Ctrl-C to stop)", flush=True)
    for url, note in shown[1:]:
        print(f"  also at {url}" + (f"   ({note})" if note else ""), flush=True)
    if not is_local(bound):
        print("note: reachable from other machines; there is no authentication", flush=True)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve()  # returns on Ctrl-C or SIGTERM (waitress catches KeyboardInterrupt)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()
        sock.close()
    print("\nstopped", flush=True)
    return 0
