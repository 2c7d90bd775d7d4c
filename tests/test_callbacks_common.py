"""trainer_hook.callbacks: what both framework callbacks share (no framework needed)."""
from __future__ import annotations

import logging

import pytest
import torch

from trainer_hook.callbacks import (StepPublisher, check_every_n_steps, effective_weight, generated_run_name,
                                    safe_run_name, vocab_of)


def test_run_names_are_made_safe_and_agree_across_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert safe_run_name("out/exp 1\\a\tb") == "out-exp 1-a-b"
    assert safe_run_name("/") == "run" and safe_run_name("..") == "run" and len(safe_run_name("x" * 500)) == 200
    for k, v in {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "0")
    first = generated_run_name("hf")
    monkeypatch.setenv("RANK", "1")  # another rank of the same job: same name
    assert generated_run_name("hf") == first and first.startswith("hf-")
    monkeypatch.setenv("MASTER_PORT", "29501")  # another job: another name
    assert generated_run_name("hf") != first


def test_vocab_by_id_with_gaps_and_rows() -> None:
    class Tok:
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "c": 2, "d": 3}

    class Processor:
        tokenizer = Tok()

    assert vocab_of(Tok()) == ["a", "", "c", "d"]
    assert vocab_of(Processor(), rows=3) == ["a", "", "c"]  # ids past the embedding's rows name nothing
    assert vocab_of(None) is None and vocab_of(object()) is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_every_n_steps_must_be_a_positive_int(bad) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer or None"):
        check_every_n_steps(bad)
    assert check_every_n_steps(None) is None and check_every_n_steps(7) == 7


def test_a_failing_publish_is_logged_once_and_training_goes_on(tcp_endpoint: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="embedding_monitor")
    monitor = StepPublisher(tcp_endpoint, 1, {"connect_grace_s": 0})
    monitor.start("fails", None, None, meta={})
    try:
        three_d = torch.zeros(2, 3, 4)  # not an embedding matrix: publish raises inside
        assert monitor.publish(lambda: three_d, 1) is False
        assert monitor.publish(lambda: three_d, 2) is False
        assert monitor.publish(lambda: three_d, 2) is False  # the same step is not retried
        assert monitor.publish(lambda: torch.zeros(4, 3), 3) is False  # no daemon: an ordinary drop
    finally:
        monitor.close()
    assert monitor.failures == 2 and not monitor.active
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "publishing step 1 failed" in errors[0].getMessage()
    assert "2-D floating tensor" in str(errors[0].exc_info[1])


def test_effective_weight_of_a_plain_embedding_is_its_weight() -> None:
    emb = torch.nn.Embedding(5, 3)
    assert effective_weight(emb).data_ptr() == emb.weight.data_ptr()  # no copy on the training thread
