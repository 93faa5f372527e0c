#!/usr/bin/env python3
"""A Python client of the seed's `proto.PubSubService`, generated at run time from
proto/seed/pubsub.proto and nothing else, checked against a running topichub.

Usage: seed_client.py HOST:PORT

It is driven by tests/seed_python.rs (`cargo test --test seed_python`), which starts the broker,
watches topic `seed.py` over topichub.v1 gRPC and SSE, and talks to this script in lines:

  stdout (script -> test)                 stdin (test -> script)
  PASS <check>                            EXPECT <hex>  the test published this payload to
  SUBSCRIBED <pattern>                                  `seed.py` (over HTTP or topichub.v1);
  PUBLISHED <topic> <hex>                               each seed subscription here must
  READY                                                 receive it next
  RECEIVED <pattern> <hex>                EOF           nothing more; finish
  DONE

Payloads travel as lowercase hex. Run by hand with stdin closed (`... < /dev/null`), it does the
seed-only checks. Exit status 0 means every check passed; a failure prints a traceback to stderr
and exits 1. Every wait is bounded by WAIT_SECONDS.
"""

import importlib.resources
import pathlib
import queue
import sys
import tempfile
import threading

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]
SEED_PROTO = REPO / "proto" / "seed" / "pubsub.proto"

# The topic the Rust test watches over topichub.v1 and SSE, and publishes to.
TOPIC = "seed.py"
# Matches TOPIC and `seed.other`, but not `seed.py.deep` (`*` is exactly one token).
WILDCARD = "seed.*"

WAIT_SECONDS = 10
# Not UTF-8 (a lone 0xff, a truncated sequence, a stray continuation byte), plus every byte value.
BINARY_PAYLOAD = bytes([0x00, 0xFF, 0xC3, 0x28, 0x80, 0x0A]) + bytes(range(256))
# One past the broker's default payload limit (1 MiB).
OVERSIZED_PAYLOAD = 1024 * 1024 + 1


def say(*words):
    """One protocol line on stdout, flushed at once (the test reads line by line)."""
    print(*words, flush=True)


def generate_stubs(out_dir):
    """Compiles proto/seed/pubsub.proto with grpc_tools' protoc; returns (pubsub_pb2, pubsub_pb2_grpc).

    google/protobuf/empty.proto comes from the well-known protos bundled with grpc_tools.
    """
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{SEED_PROTO.parent}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            SEED_PROTO.name,
        ]
    )
    assert status == 0, f"protoc failed on {SEED_PROTO} (exit status {status})"
    sys.path.insert(0, str(out_dir))
    import pubsub_pb2
    import pubsub_pb2_grpc

    return pubsub_pb2, pubsub_pb2_grpc


class SeedSubscription:
    """A seed Subscribe stream, read by a background thread into a queue so every wait is bounded."""

    def __init__(self, stub, pb2, pattern):
        self.pattern = pattern
        self._call = stub.Subscribe(pb2.SubscribeRequest(topic=pattern))
        self._live = threading.Event()
        self._received = queue.Queue()
        self._thread = threading.Thread(target=self._read, name=f"seed {pattern}", daemon=True)
        self._thread.start()

    def _read(self):
        try:
            # The seed stream has no first event; its response headers arrive once the server
            # has registered the subscription, so they mark it live. (A refused Subscribe
            # answers with trailers only; its error is then the first item of the queue.)
            self._call.initial_metadata()
            self._live.set()
            for response in self._call:
                self._received.put(response.payload)
            self._received.put(AssertionError(f"seed subscription {self.pattern!r} ended"))
        except grpc.RpcError as error:
            self._received.put(error)
        finally:
            self._live.set()

    def wait_live(self):
        assert self._live.wait(WAIT_SECONDS), (
            f"seed Subscribe({self.pattern!r}) got no response headers within {WAIT_SECONDS}s"
        )

    def expect(self, payload, what):
        """The next message must carry exactly `payload`."""
        try:
            got = self._received.get(timeout=WAIT_SECONDS)
        except queue.Empty:
            raise AssertionError(
                f"seed subscription {self.pattern!r} received nothing within {WAIT_SECONDS}s; "
                f"expected {what} ({payload.hex()})"
            ) from None
        if isinstance(got, grpc.RpcError):
            raise AssertionError(
                f"seed subscription {self.pattern!r} failed while waiting for {what}: {describe(got)}"
            )
        if isinstance(got, Exception):
            raise got
        assert got == payload, (
            f"seed subscription {self.pattern!r} expected {what} ({payload.hex()}), got {got.hex()}"
        )

    def close(self):
        self._call.cancel()
        self._thread.join(WAIT_SECONDS)


def is_utf8(payload):
    try:
        payload.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def describe(error):
    return f"{error.code().name}: {error.details()}"


def check_reflection(channel, pb2):
    """Server reflection (v1alpha) lists both gRPC APIs, and serves proto.PubSubService exactly as
    the local proto/seed/pubsub.proto defines it."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=WAIT_SECONDS))
    assert len(responses) == 1, f"one reflection request should get one answer, got {responses}"
    services = {s.name for s in responses[0].list_services_response.service}
    for expected in ("proto.PubSubService", "topichub.v1.PubSub"):
        assert expected in services, f"reflection lists {sorted(services)}, missing {expected}"

    served = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    remote = served.FindServiceByName("proto.PubSubService")
    local = pb2.DESCRIPTOR.services_by_name["PubSubService"]

    def shape(service):
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in service.methods
        }

    assert shape(remote) == shape(local), (
        f"reflection serves proto.PubSubService as {shape(remote)}, but {SEED_PROTO.name} says {shape(local)}"
    )
    def fields(message):
        return [(f.name, f.number, f.type) for f in message.fields]

    for name in ("PublishRequest", "SubscribeRequest", "SubscribeResponse"):
        remote_message = served.FindMessageTypeByName(f"proto.{name}")
        local_message = pb2.DESCRIPTOR.message_types_by_name[name]
        assert fields(remote_message) == fields(local_message), (
            f"reflection serves proto.{name} with fields {fields(remote_message)}, "
            f"but {SEED_PROTO.name} says {fields(local_message)}"
        )
    say("PASS reflection")


def expect_rejected(call, code, *mentions):
    """`call()` must fail with `code`, and its message must mention each of `mentions`."""
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() == code, f"expected {code.name}, got {describe(error)}"
        for text in mentions:
            assert text in error.details(), f"error message should mention {text!r}: {describe(error)}"
        return
    raise AssertionError(f"expected {code.name} mentioning {mentions}, but the call succeeded")


def check_bad_input(stub, pb2):
    """Invalid publishes and subscribes are refused with precise errors."""

    def publish_to(topic, payload=b"x"):
        return lambda: stub.Publish(pb2.PublishRequest(topic=topic, payload=payload), timeout=WAIT_SECONDS)

    def subscribe_to(pattern):
        def first_message():
            call = stub.Subscribe(pb2.SubscribeRequest(topic=pattern), timeout=WAIT_SECONDS)
            try:
                next(call)
            finally:
                call.cancel()

        return first_message

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    expect_rejected(publish_to("bad topic"), invalid, '"bad topic"')
    expect_rejected(publish_to(""), invalid, "empty")
    expect_rejected(publish_to(WILDCARD), invalid, f'"{WILDCARD}"', "wildcard")
    expect_rejected(publish_to("seed.>"), invalid, '"seed.>"', "wildcard")
    expect_rejected(
        publish_to(TOPIC, b"\0" * OVERSIZED_PAYLOAD),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        str(OVERSIZED_PAYLOAD),
        "limit",
    )
    expect_rejected(subscribe_to("seed.>.py"), invalid, '"seed.>.py"')
    expect_rejected(subscribe_to("seed..py"), invalid, '"seed..py"')
    say("PASS bad-input")


def publish(stub, pb2, topic, payload):
    """A seed Publish; those to TOPIC are announced, for the test to find on its other doors."""
    stub.Publish(pb2.PublishRequest(topic=topic, payload=payload), timeout=WAIT_SECONDS)
    if topic == TOPIC:
        say("PUBLISHED", topic, payload.hex())


def check_round_trip(stub, pb2, subscriptions, payload, name):
    """A seed Publish to TOPIC reaches every seed subscription, bytes unchanged."""
    publish(stub, pb2, TOPIC, payload)
    for subscription in subscriptions:
        subscription.expect(payload, f"the {name} payload")
    say("PASS", name)


def check_wildcard(stub, pb2, exact, wildcard):
    """`seed.*` receives `seed.other` but not `seed.py.deep`; `seed.py` receives neither."""
    publish(stub, pb2, "seed.py.deep", b"two tokens after seed: no match")
    publish(stub, pb2, "seed.other", b"for the wildcard only")
    marker = b"after the wildcard check"
    publish(stub, pb2, TOPIC, marker)
    wildcard.expect(b"for the wildcard only", "the seed.other message (and not seed.py.deep)")
    wildcard.expect(marker, "the marker on seed.py")
    exact.expect(marker, "the marker (and nothing from seed.other or seed.py.deep)")
    say("PASS wildcard")


def serve_test_publishes(subscriptions):
    """For each `EXPECT <hex>` on stdin, every subscription must receive that payload next."""
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        assert command == "EXPECT", f"unknown command from the test: {line!r}"
        payload = bytes.fromhex(argument)
        for subscription in subscriptions:
            subscription.expect(payload, "the payload the test published")
            say("RECEIVED", subscription.pattern, payload.hex())


def check_streams(stub, pb2):
    """Seed Subscribe to TOPIC and WILDCARD: seed publishes (text, binary, wildcard matching), then
    whatever the test publishes through the other doors."""
    exact = SeedSubscription(stub, pb2, TOPIC)
    wildcard = SeedSubscription(stub, pb2, WILDCARD)
    subscriptions = [exact, wildcard]
    try:
        for subscription in subscriptions:
            subscription.wait_live()
            say("SUBSCRIBED", subscription.pattern)
        check_round_trip(stub, pb2, subscriptions, b"hello from the seed's Python client", "text")
        assert not is_utf8(BINARY_PAYLOAD), "the binary payload must not be valid UTF-8"
        check_round_trip(stub, pb2, subscriptions, BINARY_PAYLOAD, "binary")
        check_wildcard(stub, pb2, exact, wildcard)
        say("READY")
        serve_test_publishes(subscriptions)
    finally:
        for subscription in subscriptions:
            subscription.close()


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT")
    target = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="seed-stubs-") as stubs_dir:
        pb2, pb2_grpc = generate_stubs(stubs_dir)
        with grpc.insecure_channel(target) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=WAIT_SECONDS)
            except grpc.FutureTimeoutError:
                raise AssertionError(f"could not connect to {target} within {WAIT_SECONDS}s") from None
            stub = pb2_grpc.PubSubServiceStub(channel)
            check_reflection(channel, pb2)
            check_bad_input(stub, pb2)

            check_streams(stub, pb2)
    say("DONE")


if __name__ == "__main__":
    main()
