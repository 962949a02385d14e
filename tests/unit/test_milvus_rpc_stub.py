"""Which stub the store's two calls use: the channel's own, adding the identifier header that
pymilvus' only interceptor would, or pymilvus' stub whenever anything else is in the way."""

from __future__ import annotations

import grpc

from imgsearch.milvus_rpc import stub_and_headers


class Handler:
    """pymilvus' GrpcHandler as far as the store reads it."""

    def __init__(self, **kw) -> None:
        self.__dict__.update({"_channel": grpc.insecure_channel("127.0.0.1:1"), "_identifier": 42,
                              "_authorization_interceptor": None, "_stub": object(), **kw})


class Unknown:
    _stub = object()


def handler(**kw) -> Handler:
    return Handler(**kw)


def test_a_plain_connection_gets_a_stub_on_its_channel_and_the_identifier_header():
    h = handler()
    stub, headers = stub_and_headers(h)
    assert stub is not h._stub and headers == [("identifier", "42")]
    assert stub_and_headers(h)[0] is stub  # built once per channel
    h._channel = grpc.insecure_channel("127.0.0.1:2")  # pymilvus reconnected
    assert stub_and_headers(h)[0] is not stub


def test_a_token_or_an_unknown_handler_keeps_pymilvus_stub():
    for h in (handler(_authorization_interceptor=object()), handler(_identifier=None), handler(_channel=None),
              Unknown()):
        assert stub_and_headers(h) == (h._stub, [])
