"""A warm ClientApp executor: one long-lived process that runs every ClientApp task of a SuperNode.

By default a SuperNode starts ``flower-superexec``, which starts a fresh ``flwr-clientapp`` process
per message: every round re-imports torch/transformers/peft and reloads the base model. With
``flower-supernode --isolation process`` the SuperNode starts no executor and waits for an external
one on its Runtime API (``--port``). This module is that executor: it imports fedpeft once, then
loops ``AcquireTask`` -> pull the task input -> call the fedpeft ClientApp in-process -> push the
reply and the task output. The per-process model cache (:data:`fedpeft.runtime.PROCESS_RUNTIMES`) stays
loaded between rounds, and ``context.state`` still goes back to the SuperNode after every task.

It uses the same Runtime API calls as Flower's own ``flwr-clientapp`` (flwr 1.41), but it must
outlive any one task, so it never lets a task wedge it:

* every Runtime API call is retried for at most ``retry_time`` seconds (Flower's invoker retries
  forever, and on HTTP 401 sends SIGINT to its own process);
* a task whose token the SuperNode no longer accepts (401/403: its run ended, or the SuperNode
  failed the task) is dropped without a reply, and the executor goes back to polling;
* a task whose input never arrives is abandoned as soon as the SuperNode offers a newer task. The
  SuperNode handles one message at a time and only creates a task after the previous one was
  answered or given up, so a newer task means the old one is orphaned. This is the SuperLink
  restart case: Flower 1.41's SuperNode gives up a message whose run ended while its content was
  being fetched (``RunNotRunningException`` is a ``BaseException`` that skips its clean-up) but
  leaves the task running and the content missing; the task is finished as FAILED, with no reply,
  so the SuperNode's reply queue stays in step. ``input_timeout`` bounds the wait otherwise.

It only runs the fedpeft app (checked by FAB id).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, RetryState, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message

if TYPE_CHECKING:
    from flwr.supercore.protobuf.client import ProtobufClientInterceptor

log = logging.getLogger("fedpeft.warm")
FAB_ID = "fedpeft/fedpeft-app"
RETRY_TIME = 60.0  # seconds one Runtime API call is retried (the SuperNode is local; only a restart makes it absent)
INPUT_TIMEOUT = 1800.0  # seconds to wait for a task's message content while no newer task exists
_RETRYABLE_STATUS = frozenset({502, 503, 504})
_GONE_STATUS = frozenset({401, 403})  # the task token is revoked / the run is not running


class Superseded(Exception):
    """A newer task exists while this task's input has not arrived: the SuperNode gave this task up."""


@dataclass
class TaskOutcome:
    """What became of one task: ``completed``, ``failed`` (error reply sent) or ``dropped`` (no reply)."""

    status: str
    run_id: int | None = None
    seconds: float = 0.0


def _is_gone(exc: BaseException) -> bool:
    """True for the SuperNode's 401/403: it no longer accepts the task (its run ended, or it failed the task)."""
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in _GONE_STATUS


def retry_invoker(max_time: float | None) -> RetryInvoker:
    """Retry transport errors and HTTP 502/503/504 with backoff for at most ``max_time`` seconds.

    Any other HTTP error (401/403 included) is raised at once, and nothing is ever signalled.
    """

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in _RETRYABLE_STATUS

    def backoff(state: RetryState) -> None:
        log.warning("Runtime API call failed (%s); retrying (%.1f s so far)", state.exception, state.elapsed_time)

    return RetryInvoker(lambda: exponential(base_delay=0.5, max_delay=5), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=max_time, should_giveup=give_up, on_backoff=backoff)


def _client(address: str, component: str, token: str | None = None,
            retry_time: float | None = RETRY_TIME) -> RuntimeHttpClient:
    """A Runtime API client; ``retry_time=None`` means no retries at all (used for heartbeats)."""
    interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors,
        retry_invoker=None if retry_time is None else retry_invoker(retry_time))


class Acquirer:
    """Claims ClientApp tasks from the SuperNode; a task claimed while another one runs is kept for later."""

    def __init__(self, client: RuntimeHttpClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._pending: str | None = None

    def _claim(self) -> str | None:
        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                         agentapp_fab_hashes=[]))
        return res.token if res.HasField("task") and res.token else None

    def acquire(self) -> str | None:
        """The token of the next task (a kept one first), or None if there is none."""
        with self._lock:
            token, self._pending = self._pending or self._claim(), None
            return token

    def newer_task_waiting(self) -> bool:
        """Claim a newer task if the SuperNode has one (kept for :meth:`acquire`); True if one is kept."""
        with self._lock:
            if self._pending is None:
                try:
                    self._pending = self._claim()
                except httpx.HTTPError as ex:  # cannot tell now; the caller keeps waiting and asks again
                    log.debug("AcquireTask failed while a task waits for its input: %s", ex)
            return self._pending is not None


def _heartbeat_fn(client: RuntimeHttpClient, gone: threading.Event) -> Callable[[], bool]:
    """Task heartbeat that flags ``gone`` when the SuperNode rejects the task (instead of Flower's SIGINT)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in _GONE_STATUS:
                gone.set()
                return True
            return err.response.status_code not in _RETRYABLE_STATUS
        if not res.success:
            gone.set()
        return True

    return beat


def pull_input(client: RuntimeHttpClient, acquirer: Acquirer, input_timeout: float,
               check_every: float = 1.0) -> tuple[Message, Context, Run]:
    """Pull the task's context, run and message; :class:`Superseded` if its content stalls behind a newer task."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run = context_from_proto(res.context), run_from_proto(res.run)
    if run.fab_id != FAB_ID:
        raise RuntimeError(f"this warm executor only runs {FAB_ID!r}, not {run.fab_id!r}")
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task on the SuperNode")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    pull_object = make_pull_object_fn_protobuf(client.PullObject, node, run.run_id)
    last_check = [time.monotonic()]

    def pull(object_id: str) -> bytes:
        try:
            return pull_object(object_id)
        except ObjectUnavailableError:  # the SuperNode is still fetching it from the SuperLink, or gave up
            now = time.monotonic()
            if now - last_check[0] >= check_every:
                last_check[0] = now
                if acquirer.newer_task_waiting():
                    raise Superseded(f"run {run.run_id}: message content never arrived") from None
            raise

    message = pull_and_inflate_object_from_tree(
        tree, pull, make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run.run_id),
        return_type=Message, max_time=input_timeout, max_tries_per_object=None, initial_backoff=0.1,
        backoff_cap=2.0)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run


def _push_output(client: RuntimeHttpClient, context: Context | None, status: str, details: str) -> None:
    client.PushTaskOutput(PushTaskOutputRequest(context=context_to_proto(context) if context else None,
                                                sub_status=status, details=details))


def run_task(address: str, token: str, acquirer: Acquirer, retry_time: float = RETRY_TIME,
             input_timeout: float = INPUT_TIMEOUT) -> TaskOutcome:
    """Run one ClientApp task in this process; never raises, never waits without bound."""
    from fedpeft.clients.app import app  # imported once per process (cached by Python)

    t0 = time.perf_counter()
    client = _client(address, "flwr-clientapp", token, retry_time)
    beat_client = _client(address, "flwr-clientapp", token, None)
    gone = threading.Event()
    heartbeat = HeartbeatSender(_heartbeat_fn(beat_client, gone))
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    outcome = TaskOutcome("failed")
    details = "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, run = pull_input(client, acquirer, input_timeout)
        outcome.run_id = run.run_id
        log.info("task of run %d: %s message, round %s", run.run_id, message.metadata.message_type,
                 message.metadata.group_id or "-")
        reply = app(message=message, context=context)
        outcome.status, details = "completed", ""
    except Superseded as ex:
        outcome.status, details = "dropped", f"abandoned by the SuperNode: {ex}"
        log.warning("dropping the task: %s; a newer task is waiting", ex)
    except Exception as ex:  # noqa: BLE001 - reported to the server as an error reply, like flwr-clientapp
        if _is_gone(ex) or gone.is_set():
            outcome.status = "dropped"
            log.warning("dropping the task: the SuperNode no longer accepts it (its run ended or it was failed)")
        else:
            log.exception("ClientApp task failed")
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        if heartbeat.is_running:
            heartbeat.stop()
        try:
            if outcome.status != "dropped" and gone.is_set():
                outcome.status = "dropped"
                log.warning("dropping the reply: the SuperNode gave the task up while it ran")
            elif outcome.status == "dropped":  # an orphaned task: finish it, without a reply, so it never expires
                _push_output(client, None, SubStatus.FAILED, details)
            else:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                sub = SubStatus.COMPLETED if outcome.status == "completed" else SubStatus.FAILED
                _push_output(client, context, sub, details)
        except Exception as ex:  # noqa: BLE001 - the SuperNode went away or gave the task up meanwhile
            if not _is_gone(ex):
                log.error("failed to push the task output: %s", ex)
                outcome.status = "failed"
            elif outcome.status != "dropped":
                log.warning("dropping the reply: the SuperNode no longer accepts the task")
                outcome.status = "dropped"
        client.close()
        beat_client.close()
    outcome.seconds = time.perf_counter() - t0
    log.info("task %s in %.2f s", outcome.status, outcome.seconds)
    return outcome


def serve(address: str, poll: float = 0.2, stop: threading.Event | None = None, retry_time: float = RETRY_TIME,
          input_timeout: float = INPUT_TIMEOUT) -> None:
    """Acquire and run ClientApp tasks from the SuperNode Runtime API at ``address`` until stopped."""
    import fedpeft.clients.app  # noqa: F401 - the warm part: torch, transformers, peft, fedpeft

    stop = stop or threading.Event()
    client = _client(address, "SuperExec", retry_time=retry_time)
    acquirer = Acquirer(client)
    log.info("warm executor ready on %s (pid %d)", address, os.getpid())
    failures = 0
    try:
        while not stop.is_set():
            try:
                token = acquirer.acquire()
                failures = 0
            except Exception as ex:  # noqa: BLE001 - the SuperNode is restarting: keep the model, try again
                failures += 1
                log.warning("cannot reach the SuperNode Runtime API (%s); retrying", ex)
                stop.wait(min(30.0, poll * 2 ** min(failures, 8)))
                continue
            if token:
                run_task(address, token, acquirer, retry_time, input_timeout)
            else:
                stop.wait(poll)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m fedpeft.deploy.warm --runtime-api-address 127.0.0.1:9094``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between AcquireTask polls when idle")
    p.add_argument("--retry-time", type=float, default=RETRY_TIME,
                   help="seconds one Runtime API call is retried before the task fails")
    p.add_argument("--input-timeout", type=float, default=INPUT_TIMEOUT,
                   help="seconds to wait for a task's message content while no newer task exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(args.runtime_api_address, args.poll, stop, args.retry_time, args.input_timeout)


if __name__ == "__main__":
    main()
