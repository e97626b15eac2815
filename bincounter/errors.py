"""What a user sees when a command fails: one ``error: ...`` line that names the bad thing.

Stage modules raise ordinary, clear exceptions (``ValueError`` with a message,
``FileNotFoundError`` naming the path, botocore and urllib3 errors as they come).
``bincounter.cli`` catches whatever escapes a command and turns it into one line
with :func:`describe`; ``--debug`` (or ``BINCOUNTER_DEBUG=1``) shows the traceback
instead. Exit codes: 2 for bad usage (:class:`UsageError`, argparse errors), 1 for
everything else.

Kept free of heavy imports: botocore, urllib3 and kubernetes are looked at only
when the exception in hand comes from them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

USAGE_EXIT = 2
FAILURE_EXIT = 1
DEBUG_ENV = "BINCOUNTER_DEBUG"


class UsageError(ValueError):
    """Bad command-line input (a flag's value, a combination of flags): exit code 2."""


class UserError(RuntimeError):
    """A problem the user can fix (a missing input, an unwritable output), with a message that says how."""


@contextlib.contextmanager
def about_file(uri: str, what: str) -> Iterator[None]:
    """Name the file when reading it fails: ``with about_file(uri, "checkpoint"): torch.load(...)``.

    A corrupt checkpoint or shard otherwise surfaces as "PytorchStreamReader failed reading
    zip archive" or "unexpected end of data", which does not say which of many files is bad.
    """
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{what} not found: {uri}") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        detail = explain(e) or f"{type(e).__name__}: {e}"
        raise UserError(f"cannot read {what} {uri}: {detail}") from e


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, UsageError):
        return USAGE_EXIT
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return FAILURE_EXIT


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts (a wrapper's cause often names the host or file)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _host_of(pool) -> str:
    host, port = getattr(pool, "host", None), getattr(pool, "port", None)
    return f"{host}:{port}" if host and port else str(host or "the server")


def _os_error(e: OSError) -> str | None:
    where = e.filename if e.filename is not None else None
    if isinstance(e, FileNotFoundError) and where is not None:
        return f"no such file or folder: {where}"
    if isinstance(e, PermissionError) and where is not None:
        return f"permission denied: {where} (check that it is writable/readable by this user)"
    if isinstance(e, NotADirectoryError) and where is not None:
        return f"not a folder: {where}"
    if isinstance(e, IsADirectoryError) and where is not None:
        return f"is a folder, expected a file: {where}"
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused: {e}"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"timed out: {e}" if str(e) else "timed out"
    if where is None and str(e):
        return str(e)
    return None


def _botocore(e: BaseException) -> str | None:
    module = type(e).__module__
    if not module.startswith("botocore"):
        return None
    from botocore import exceptions as be

    if isinstance(e, (be.NoCredentialsError, be.PartialCredentialsError)):
        return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or read a public bucket anonymously (download --auth unsigned)")
    if isinstance(e, be.ClientError):
        err = e.response.get("Error", {})
        code, bucket = str(err.get("Code", "")), err.get("BucketName")
        if code == "NoSuchBucket":
            what = f"bucket {bucket}" if bucket else f"the bucket of this {e.operation_name} call"
            return f"{what} does not exist (check the s3:// URI, or create the bucket first)"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return f"the S3 credentials were rejected ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return (f"access denied by S3 ({e.operation_name}{' on bucket ' + bucket if bucket else ''}): "
                    "check the credentials and the bucket policy")
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"S3 object not found ({e.operation_name}): {err.get('Key') or err.get('Message') or code}"
        return f"S3 {e.operation_name} failed: {code}: {err.get('Message', '')}".rstrip(": ")
    if isinstance(e, (be.ConnectTimeoutError, be.ReadTimeoutError)):
        return f"the S3 endpoint did not answer in time: {e}"
    if isinstance(e, be.EndpointConnectionError):
        return f"cannot reach the S3 endpoint: {e} (check AWS_ENDPOINT_URL / --endpoint-url)"
    return str(e) or type(e).__name__


def _urllib3(e: BaseException) -> str | None:
    if not type(e).__module__.startswith("urllib3"):
        return None
    from urllib3 import exceptions as ue

    if isinstance(e, ue.MaxRetryError) and e.reason is not None:
        reason = e.reason
        host = _host_of(e.pool)
        if isinstance(reason, ue.NewConnectionError):  # before ConnectTimeoutError: it is a subclass
            return f"cannot connect to {host}: {_new_connection_reason(reason)}"
        if isinstance(reason, ue.ConnectTimeoutError):
            return f"{host} did not accept the connection in time (connect timeout): is the address right?"
        if isinstance(reason, ue.ReadTimeoutError):
            return f"{host} accepted the connection but did not answer in time (read timeout)"
        return f"request to {host} failed: {reason}"
    if isinstance(e, ue.ReadTimeoutError):
        return f"{_host_of(e.pool)} accepted the connection but did not answer in time (read timeout)"
    if isinstance(e, ue.NewConnectionError):
        return f"cannot connect: {_new_connection_reason(e)}"
    return None


def _new_connection_reason(e: BaseException) -> str:
    text = str(e)
    if "refused" in text.lower():
        return "connection refused (is the server running, and is the host and port right?)"
    if "resolve" in text.lower() or "Name or service not known" in text:
        return "unknown host name"
    return text.split(": ", 1)[-1]


def _kubernetes(e: BaseException) -> str | None:
    if not type(e).__module__.startswith("kubernetes"):
        return None
    try:  # importable whenever one of its exceptions was raised; only images with the k8s extra have it
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config import ConfigException
    except ImportError:
        return None

    if isinstance(e, ConfigException):
        return (f"no usable Kubernetes configuration ({e}): pass --kubeconfig FILE, set KUBECONFIG, "
                "or run inside a pod with a service account")
    if isinstance(e, ApiException):
        return f"the Kubernetes API answered {e.status} {e.reason}: {(e.body or '').strip()[:300]}"
    return None


def _kfp_server_api(e: BaseException) -> str | None:
    if not type(e).__module__.startswith("kfp_server_api"):
        return None
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    body = (getattr(e, "body", None) or "").strip()[:300]
    return f"the Kubeflow Pipelines API answered {status} {reason}" + (f": {body}" if body else "")


def _requests(e: BaseException) -> str | None:
    if not type(e).__module__.startswith("requests"):
        return None
    import requests

    if isinstance(e, requests.Timeout):
        return f"the server did not answer in time: {e}"
    if isinstance(e, requests.ConnectionError):
        return f"cannot connect: {e}"
    return None


def explain(exc: BaseException) -> str | None:
    """One line for the user when the exception is one we know how to put in words, else None."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, (UserError, UsageError)):  # written for the user, naming the file or flag
        return _one_line(str(exc))
    for e in _chain(exc):
        for explain_library_error in (_botocore, _urllib3, _kubernetes, _kfp_server_api, _requests):
            message = explain_library_error(e)
            if message:
                return _one_line(message)
    # No library error in the chain: the exception's own message (ours are written for users).
    for e in _chain(exc):
        if isinstance(e, OSError):
            message = _os_error(e)
            if message:
                return _one_line(message)
    message = str(exc)
    if isinstance(exc, KeyError):  # KeyError('x') is a bug; KeyError("Split 'x' not in ...") a message
        arg = exc.args[0] if exc.args else None
        return _one_line(arg) if isinstance(arg, str) and " " in arg else None
    if isinstance(exc, (ValueError, UserError)) and message:
        return _one_line(message)
    return None


def describe(exc: BaseException) -> str:
    """One line for the user, for any exception (an unknown one by its type and message)."""
    message = explain(exc)
    if message is None:
        text = _one_line(str(exc)) if str(exc) else ""
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else "failed"


def check_port_free(port: int, host: str = "0.0.0.0", what: str = "--port") -> None:
    """Fail before loading a model when the server could not listen anyway."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"{what} {port} is not free ({e.strerror}): stop the process using it, or pass "
                            "another port") from None


TIMEOUT_ENV = "BINCOUNTER_REQUEST_TIMEOUT"
DEFAULT_TIMEOUTS = (10.0, 60.0)


def request_timeouts() -> tuple[float, float]:
    """``(connect, read)`` seconds for every call to the Kubernetes and Pipelines APIs.

    Their generated clients wait forever by default: a host that accepts the connection
    and never answers would hang the command. ``$BINCOUNTER_REQUEST_TIMEOUT`` sets the
    read timeout (the connect timeout is the smaller of it and 10 s).
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUTS
    try:
        read = float(raw)
        if read <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"${TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}") from None
    return (min(DEFAULT_TIMEOUTS[0], read), read)


def with_timeouts(api_client_class: type) -> type:
    """A subclass of a generated OpenAPI client (kubernetes, kfp_server_api) whose requests
    default to :func:`request_timeouts` instead of waiting forever."""

    class TimeoutApiClient(api_client_class):
        def request(self, method, url, *args, _request_timeout=None, **kwargs):
            return super().request(method, url, *args, _request_timeout=_request_timeout or request_timeouts(),
                                   **kwargs)

    TimeoutApiClient.__name__ = TimeoutApiClient.__qualname__ = f"Timeout{api_client_class.__name__}"
    return TimeoutApiClient
