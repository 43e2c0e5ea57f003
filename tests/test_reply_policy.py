"""Where replies may go (issue 15): the worker's reply policy, its setting, and prepare_request's use."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from jetinfer.errors import InvalidInputError, SettingsError
from jetinfer.protocol import Limits, request_headers
from jetinfer.repository import ModelConfig, TensorSpec
from jetinfer.settings import load_settings
from jetinfer.streams import parse_infer_subject, subject_matches
from jetinfer.worker.prepare import prepare_request
from jetinfer.worker.reply_policy import ReplyPolicy
from jetinfer.worker.settings import WorkerSettings

POLICY = ReplyPolicy(own_inbox_prefix="_INBOX.worker")

# Subjects a reply must never reach, whoever sends the request.
FORBIDDEN = [
    "jetinfer.control.reload.m",
    "dlq.m",
    "infer.m",
    "infer.m.producer_b",
    "$JS.API.STREAM.DELETE.INFER",
    "$JS.API.CONSUMER.MSG.NEXT.INFER.worker-m",
    "$JS.ACK.INFER.worker-m.1.1.1.1.0",
    "$SYS.REQ.SERVER.PING",
    "$KV.config.key",
    "_INBOX",  # a prefix itself is no inbox
    "results",
    "_INBOXES.x",  # prefixes match whole tokens
    "results2.job",
    "metrics.anything",
    "_INBOX.worker.KxU3.1",  # the worker's own inbox: pulled batches and JetStream API answers
    "_INBOX.worker",
]


@pytest.mark.parametrize(
    "reply_to", ["_INBOX.abc.1", "_INBOX.producer_a.x.7", "results.job-1", "results.a.b"]
)
def test_a_request_without_tenant_may_reply_below_the_inbox_and_results_prefixes(reply_to: str) -> None:
    assert POLICY.reply_subject(reply_to, "infer.m") == reply_to


@pytest.mark.parametrize("reply_to", FORBIDDEN)
def test_every_other_subject_is_refused_and_the_error_says_where_replies_go(reply_to: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        POLICY.reply_subject(reply_to, "infer.m")
    message = str(info.value)
    assert "Jetinfer-Reply-To" in message
    assert "_INBOX.>" in message or "own inbox" in message


@pytest.mark.parametrize("reply_to", ["_INBOX.producer_a.Zq.1", "results.producer_a.job-1.x"])
def test_a_tenants_request_may_reply_only_below_its_own_prefixes(reply_to: str) -> None:
    assert POLICY.reply_subject(reply_to, "infer.m.producer_a") == reply_to


@pytest.mark.parametrize(
    "reply_to",
    [
        *FORBIDDEN,
        "_INBOX.producer_b.Zq.1",  # another tenant's inbox
        "results.producer_b.job-1",  # another tenant's job
        "_INBOX.Zq.1",  # an inbox of nobody's tenant
        "results.job-1",
        "_INBOX.producer_a",  # the tenant's prefix itself
        "results.producer_a",
        "_INBOX.producer_ab.x",  # tenants match whole tokens
    ],
)
def test_a_tenants_request_cannot_reply_anywhere_else(reply_to: str) -> None:
    with pytest.raises(InvalidInputError, match=r"tenant producer_a|own inbox"):
        POLICY.reply_subject(reply_to, "infer.m.producer_a")


def test_the_tenant_comes_from_the_subject_and_odd_subjects_are_refused() -> None:
    assert parse_infer_subject("infer.m") == ("m", None)
    assert parse_infer_subject("infer.m.producer_a") == ("m", "producer_a")
    for subject in ("infer", "infer.m.a.b", "results.m", "infer.M", "infer.m.A", "", "infer..a"):
        with pytest.raises(InvalidInputError):
            parse_infer_subject(subject)
        with pytest.raises(InvalidInputError):
            POLICY.reply_subject("_INBOX.a.1", subject)


def test_the_workers_own_inbox_is_refused_only_where_it_is_its_own() -> None:
    # With the bare default prefix the worker's inboxes share _INBOX with every client's, so they cannot
    # be told apart (and their random tokens are not guessable); deployments set _INBOX.worker.
    assert ReplyPolicy(own_inbox_prefix="_INBOX").reply_subject("_INBOX.x.1", "infer.m") == "_INBOX.x.1"
    with pytest.raises(InvalidInputError, match="own inbox"):
        ReplyPolicy(own_inbox_prefix="_INBOX.worker").reply_subject("_INBOX.worker.x", "infer.m")


def test_prefixes_are_configurable_and_never_cover_the_workers_subjects() -> None:
    custom = ReplyPolicy(prefixes=("replies", "results"))
    assert custom.reply_subject("replies.app.1", "infer.m") == "replies.app.1"
    assert custom.reply_subject("replies.t.app", "infer.m.t") == "replies.t.app"
    with pytest.raises(InvalidInputError, match=r"below replies\.> or results\.>"):
        custom.reply_subject("_INBOX.x.1", "infer.m")
    for bad in [(), ("infer",), ("dlq.m",), ("jetinfer",), ("$JS",), ("_INBOX.*",), ("a b",), ("",)]:
        with pytest.raises(ValueError, match=r"prefix|literal tokens|worker's own"):
            ReplyPolicy(prefixes=bad)


def test_reply_prefixes_are_a_validated_setting_with_flag_and_variable() -> None:
    assert WorkerSettings().reply_prefixes == ["_INBOX", "results"]
    loaded = load_settings(WorkerSettings, environ={"JETINFER_REPLY_PREFIXES": "_INBOX,results,replies"})
    assert loaded.reply_prefixes == ["_INBOX", "results", "replies"]
    for bad in (["dlq"], ["$SYS"], ["infer.m"], [], ["_INBOX.>"]):
        with pytest.raises(SettingsError) as info:
            WorkerSettings(reply_prefixes=bad)
        assert "--reply-prefixes" in str(info.value)
        assert "JETINFER_REPLY_PREFIXES" in str(info.value)


def test_subject_matching_follows_nats_wildcards() -> None:
    assert subject_matches("infer.m.*", "infer.m.producer_a")
    assert not subject_matches("infer.m.*", "infer.m")
    assert not subject_matches("infer.m.*", "infer.m.a.b")
    assert subject_matches("infer.>", "infer.m.a")
    assert not subject_matches("infer.>", "infer")
    assert subject_matches("infer.m", "infer.m")


CONFIG = ModelConfig(
    name="m",
    max_batch=8,
    inputs=(TensorSpec("input", "FP32", (-1,)),),
    outputs=(TensorSpec("output", "FP32", (-1,)),),
)


def delivery(subject: str, reply_to: str) -> Msg:
    import msgpack

    body = msgpack.packb(
        {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": b"\0\0\0\0"}]}
    )
    return Msg(
        _client=None,  # type: ignore[arg-type]
        subject=subject,
        reply="$JS.ACK.INFER.worker-m.1.3.3.1732490000000000000.0",
        data=body,
        headers=request_headers("r1", reply_to),
    )


def test_prepare_request_answers_a_forbidden_reply_subject_nowhere() -> None:
    for subject, reply_to in [("infer.m", "dlq.m"), ("infer.m.producer_a", "_INBOX.producer_b.x")]:
        request = prepare_request(delivery(subject, reply_to), CONFIG, max_batch=8, limits=Limits())
        assert isinstance(request.error, InvalidInputError)
        assert "not a reply subject" in request.error.message
        assert request.reply_to is None  # never published to
    served = prepare_request(
        delivery("infer.m.producer_a", "_INBOX.producer_a.x.1"), CONFIG, max_batch=8, limits=Limits()
    )
    assert served.error is None
    assert served.reply_to == "_INBOX.producer_a.x.1"
    own = prepare_request(
        delivery("infer.m", "_INBOX.worker.x"), CONFIG, max_batch=8, limits=Limits(), reply_policy=POLICY
    )
    assert isinstance(own.error, InvalidInputError)
    assert own.reply_to is None
