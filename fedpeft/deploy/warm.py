"""A warm ClientApp executor: one long-lived process that runs every ClientApp task of a SuperNode.

By default a SuperNode starts ``flower-superexec``, which starts a fresh ``flwr-clientapp`` process
per message: every round re-imports torch/transformers/peft and reloads the base model. With
``flower-supernode --isolation process`` the SuperNode starts no executor and waits for an external
one on its Runtime API (``--port``). This module is that executor: it imports fedpeft once, then
loops ``AcquireTask`` -> pull the task input -> call the fedpeft ClientApp in-process -> push the
reply and the task output. The per-process model cache (:func:`fedpeft.runtime.get_runtime`) stays
loaded between rounds, and ``context.state`` still goes back to the SuperNode after every task.

It uses the same Runtime API calls as Flower's own ``flwr-clientapp`` (flwr 1.41), without its
``flwr_exit`` (which ends the process). It only runs the fedpeft app (checked by FAB id).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger("fedpeft.warm")
FAB_ID = "fedpeft/fedpeft-app"


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str) -> bool:
    """Run one ClientApp task in this process; returns True if the app completed."""
    from fedpeft.clients.app import app  # imported once per process (cached by Python)

    client = _client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    t0 = time.perf_counter()
    try:
        heartbeat.start()
        message, context, run, _fab = pull_task_input(client)
        if run.fab_id != FAB_ID:
            raise RuntimeError(f"this warm executor only runs {FAB_ID!r}, not {run.fab_id!r}")
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - reported to the server as an error reply, like flwr-clientapp
        log.exception("ClientApp task failed")
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        except Exception:  # noqa: BLE001
            log.exception("failed to push the reply")
            status = SubStatus.FAILED
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    log.info("task %s in %.2f s", status, time.perf_counter() - t0)
    return status == SubStatus.COMPLETED


def serve(address: str, poll: float = 0.2, stop: threading.Event | None = None) -> None:
    """Acquire and run ClientApp tasks from the SuperNode Runtime API at ``address`` until stopped."""
    import fedpeft.clients.app  # noqa: F401 - the warm part: torch, transformers, peft, fedpeft

    stop = stop or threading.Event()
    client = _client(address, "SuperExec")
    log.info("warm executor ready on %s (pid %d)", address, os.getpid())
    try:
        while not stop.is_set():
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                        agentapp_fab_hashes=[]))
            if res.HasField("task") and res.token:
                run_task(address, res.token)
            else:
                stop.wait(poll)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m fedpeft.deploy.warm --runtime-api-address 127.0.0.1:9094``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    p.add_argument("--poll", type=float, default=0.2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(args.runtime_api_address, args.poll, stop)


if __name__ == "__main__":
    main()
