"""`orchard controller run ...` and the stand-in's own helper commands (see README.md)."""

import argparse
import json
import os
import signal
import sys
import threading

from .controller import LOCAL_PREFIX, Controller, Settings, Worker, log


def _parser():
    parser = argparse.ArgumentParser(prog="orchard", description="Orchard controller stand-in")
    sub = parser.add_subparsers(dest="group", required=True)
    controller = sub.add_parser("controller").add_subparsers(dest="command", required=True)
    run = controller.add_parser("run", help="serve the API on loopback until SIGINT/SIGTERM")
    run.add_argument("--listen", default="127.0.0.1:6120", help="HOST:PORT (port 0: pick a free one)")
    run.add_argument("--data", required=True, help="data dir: state.json, workers/<name>/tart-home")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--worker-slots", type=int, default=2, help="VMs per worker (TART_STANDIN_MAX_VMS)")
    run.add_argument("--service-account", action="append", default=[], metavar="NAME:TOKEN")
    run.add_argument("--insecure-no-auth", action="store_true")
    run.add_argument("--scheduler-interval", type=float, default=0.5, help="seconds (Orchard: 5)")
    run.add_argument("--worker-offline-timeout", type=float, default=5.0, help="seconds (Orchard: 180)")
    run.add_argument("--fail-start", action="append", default=[], metavar="GLOB",
                     help="VMs whose name matches fail to start")
    run.add_argument("--start-delay", type=float, default=0.0,
                     help="seconds a worker waits before cloning (a slow pull)")
    run.add_argument("--worker-label", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--dev", action="store_true",
                     help="as `orchard dev`: no auth, Swagger's HTML at /v1/, RPC v1 port-forwards")
    run.add_argument("--image-password", default="admin",
                     help="the password of the images' admin account (Cirrus Labs images: admin)")
    run.add_argument("--ssh-retry-delay", type=float, default=0.1,
                     help="seconds before the startup script's 2nd SSH login attempt, doubling (retry-go: 0.1)")
    run.add_argument("--tls-cert")
    run.add_argument("--tls-key")
    standin = sub.add_parser("standin").add_subparsers(dest="command", required=True)
    for name, help_text in (("worker-offline", "the worker stops reporting (its guests die)"),
                            ("worker-online", "the worker reports again")):
        cmd = standin.add_parser(name, help=help_text)
        cmd.add_argument("--data", required=True)
        cmd.add_argument("worker")
    down = standin.add_parser("down", help="stop and delete every orchard-* guest of every worker")
    down.add_argument("--data", required=True)
    return parser


def _env_list(name):
    return [item for item in os.environ.get(name, "").split(",") if item]


def main(argv):
    args = _parser().parse_args(argv)
    if args.group == "standin":
        return _standin(args)
    host, _, port = args.listen.rpartition(":")
    accounts = {}
    for item in args.service_account + _env_list("ORCHARD_STANDIN_SERVICE_ACCOUNTS"):
        name, sep, token = item.partition(":")
        if not sep:
            print("orchard: --service-account wants NAME:TOKEN", file=sys.stderr)
            return 2
        accounts[name] = token
    labels = dict(item.partition("=")[::2] for item in args.worker_label)
    settings = Settings(os.path.abspath(args.data), workers=args.workers, slots=args.worker_slots,
                        scheduler_interval=args.scheduler_interval,
                        worker_offline_timeout=args.worker_offline_timeout,
                        fail_start=args.fail_start + _env_list("ORCHARD_STANDIN_FAIL_START"),
                        start_delay=args.start_delay, worker_labels=labels, dev=args.dev,
                        image_password=args.image_password, ssh_retry_delay=args.ssh_retry_delay)
    controller = Controller(settings, accounts)
    from .api import serve

    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    server = serve(controller, host or "127.0.0.1", int(port), auth=not (args.insecure_no_auth or args.dev), tls=tls)
    url = "%s://%s:%d" % ("https" if tls else "http", host or "127.0.0.1", server.server_address[1])
    info = os.path.join(settings.data, "controller.json")
    with open(info + ".tmp", "w") as fh:
        json.dump({"url": url, "pid": os.getpid()}, fh)
    os.replace(info + ".tmp", info)
    controller.start()

    def stop(signum, frame):
        controller.stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.1)
    controller.save()
    log("stopped (guests keep running; `orchard standin down --data DIR` removes them)")
    return 0


def _standin(args):
    data = os.path.abspath(args.data)
    if args.command in ("worker-offline", "worker-online"):
        flag = os.path.join(data, "workers", args.worker, "offline")
        if not os.path.isdir(os.path.dirname(flag)):
            print("orchard: no worker %r under %s" % (args.worker, data), file=sys.stderr)
            return 1
        if args.command == "worker-offline":
            open(flag, "w").close()
        elif os.path.exists(flag):
            os.unlink(flag)
        return 0
    workers_dir = os.path.join(data, "workers")
    for name in sorted(os.listdir(workers_dir)) if os.path.isdir(workers_dir) else []:
        worker = Worker(data, name, slots=0)
        for row in worker.tart_vms():
            if row["Name"].startswith(LOCAL_PREFIX):
                if row["Running"]:
                    worker.tart("stop", "--timeout", "5", row["Name"], timeout=60)
                worker.tart("delete", row["Name"], timeout=60)
    return 0
