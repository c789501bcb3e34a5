"""`python -m serving.main`: parse SGLang-style flags, build the engine, serve HTTP until SIGTERM."""

from __future__ import annotations

import logging
import sys

from serving.server_args import ServerArgs


def main(argv: list[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # Imported after argument parsing so `--help` and flag errors answer without loading JAX.
    if args.node_rank > 0:  # --nnodes > 1: node 0 serves HTTP, the others step with it (serving/follower.py)
        from serving.follower import run_follower

        return run_follower(args)
    from serving.engine import Engine
    from serving.http.app import create_app
    from serving.multihost import stop_followers

    try:
        engine = Engine(args)
    except ValueError as exc:  # bad model path, config or checkpoint: one clear line, no traceback
        logging.getLogger("serving.main").error("%s", exc)
        stop_followers()  # with --nnodes > 1 the other hosts would wait for node 0's steps forever
        return 1
    app = create_app(engine)
    # Signals are serving/http/shutdown.py's: Sanic's handlers would cut in-flight requests short.
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, motd=False,
            debug=False, register_sys_signals=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
