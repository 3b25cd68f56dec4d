"""prefjax.data.formats: every public row layout -> canonical examples, auto-detection and its notice,
ambiguity, located errors, did-you-mean; pairs read as unpaired examples by the trainer's streams;
data.on_error="skip" through a tiny training run; the inspect CLI's --format / --fields."""

from __future__ import annotations

import json
import logging
import math

import pytest

from prefjax import train
from prefjax.data import formats, streams
from prefjax.data import inspect as data_inspect
from prefjax.data.formats import AmbiguousFormatError, check_format, iter_parse
from prefjax.data.readers import read_examples
from prefjax.data.records import DataError, LoadSummary, Location
from prefjax.models.tokenizer import load_tokenizer
from prefjax.train import config_lib
from tests.data.fixture_helpers import bot, system, user
from tests.train.test_loop import FIXTURES, _config

QWEN = FIXTURES / "hf" / "qwen2"
NAN = math.nan


def pair(prompt, chosen, rejected, fmt="chat", line=1, score_chosen=NAN, score_rejected=NAN):
    return {"kind": "pair", "format": fmt, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "score_chosen": score_chosen, "score_rejected": score_rejected, "margin": NAN, "weight": 1.0,
            "source": f"{{path}}:{line}"}


def same(a, b) -> bool:
    """Equality that treats NaN as NaN (json writes both as NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# -- one realistic row per format (column layouts of the public datasets) ----------------------

HAIKU = "Write a haiku about autumn."
SHAREGPT = {  # LLaMA-Factory's dpo_en_demo layout
    "conversations": [{"from": "human", "value": "What is the capital of France?"}],
    "chosen": {"from": "gpt", "value": "Paris."},
    "rejected": {"from": "gpt", "value": "Lyon."},
}
SHAREGPT_KTO = {  # LLaMA-Factory's kto_en_demo layout
    "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a planet."},
                      {"from": "gpt", "value": "Pluto."}],
    "kto_tag": False,
}
SHAREGPT_2 = {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
              "rejected": {"from": "gpt", "value": "5"}}
MESSAGES = {
    "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    "chosen": {"role": "assistant", "content": "4"},
    "rejected": [{"role": "assistant", "content": "5"}],
}
MESSAGES_UNPAIRED = {"messages": [user("Tell me a joke."), bot("No.")], "label": "thumbs_down"}
ALPACA_FARM = {  # tatsu-lab/alpaca_farm, alpaca_human_preference
    "instruction": "Give three tips for staying healthy.", "input": "",
    "output_1": "Eat well, sleep, move.", "output_2": "Sleep.", "preference": 1,
}
ALPACA_PAIR = {  # LLaMA-Factory's alpaca preference layout
    "instruction": "Translate to French.", "input": "The cat sleeps.",
    "chosen": "Le chat dort.", "rejected": "Le chien dort.",
}
HH = {  # Anthropic/hh-rlhf
    "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.",
    "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Microwave it whole.",
}
UFB = {  # HuggingFaceH4/ultrafeedback_binarized
    "prompt": HAIKU, "prompt_id": "4f0e",
    "chosen": [user(HAIKU), bot("Red leaves drift and fall")],
    "rejected": [user(HAIKU), bot("Autumn is a season.")],
    "messages": [user(HAIKU), bot("Red leaves drift and fall")],
    "score_chosen": 8.5, "score_rejected": 4.0,
}
ULTRAFEEDBACK = {  # openbmb/UltraFeedback
    "source": "evol_instruct", "instruction": "Name a prime number.", "models": ["gpt-4", "alpaca-7b"],
    "completions": [
        {"model": "gpt-4", "principle": "helpfulness", "custom_system_prompt": "Be helpful.",
         "annotations": {"helpfulness": {"Rating": "5"}}, "critique": "Correct.", "fine-grained_score": 4.75,
         "overall_score": 8.5, "response": "7"},
        {"model": "alpaca-7b", "principle": "honesty", "custom_system_prompt": "Be honest.",
         "annotations": {"helpfulness": {"Rating": "1"}}, "critique": "Wrong.", "fine-grained_score": 1.25,
         "overall_score": 3.0, "response": "9"},
    ],
    "correct_answers": ["None"], "incorrect_answers": ["None"],
}

CASES = [
    ("trl_pair", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     pair([user("The sky is")], [bot(" blue.")], [bot(" green.")], fmt="text")),
    ("trl_pair", {"chosen": [user("Hi"), bot("Hello!")], "rejected": [user("Hi"), bot("Go away.")]},
     pair([user("Hi")], [bot("Hello!")], [bot("Go away.")])),
    ("trl_unpaired", {"prompt": "The sky is", "completion": " green.", "label": False},
     {"kind": "unpaired", "format": "text", "prompt": [user("The sky is")], "completion": [bot(" green.")],
      "label": False, "weight": 1.0, "source": "{path}:1"}),
    ("ranked", {"prompt": "Pick a colour", "responses": ["red", "blue", "green"], "ranks": [2, 1, 3]},
     {"kind": "ranked", "format": "text", "prompt": [user("Pick a colour")],
      "responses": [[bot("red")], [bot("blue")], [bot("green")]], "scores": [-2.0, -1.0, -3.0], "weight": 1.0,
      "source": "{path}:1"}),
    ("sharegpt", SHAREGPT, pair([user("What is the capital of France?")], [bot("Paris.")], [bot("Lyon.")])),
    ("sharegpt", SHAREGPT_KTO,
     {"kind": "unpaired", "format": "chat", "prompt": [system("Be brief."), user("Name a planet.")],
      "completion": [bot("Pluto.")], "label": False, "weight": 1.0, "source": "{path}:1"}),
    ("messages", MESSAGES, pair([system("You are terse."), user("2+2?")], [bot("4")], [bot("5")])),
    ("messages", MESSAGES_UNPAIRED,
     {"kind": "unpaired", "format": "chat", "prompt": [user("Tell me a joke.")], "completion": [bot("No.")],
      "label": False, "weight": 1.0, "source": "{path}:1"}),
    ("alpaca", ALPACA_FARM, pair([user("Give three tips for staying healthy.")],
                                 [bot("Eat well, sleep, move.")], [bot("Sleep.")], fmt="text")),
    ("alpaca", ALPACA_PAIR, pair([user("Translate to French.\n\nThe cat sleeps.")], [bot("Le chat dort.")],
                                 [bot("Le chien dort.")], fmt="text")),
    ("hh_rlhf", HH, pair([user("How do I boil an egg?")], [bot("Simmer it for nine minutes.")],
                         [bot("Microwave it whole.")])),
    ("ultrafeedback_binarized", UFB,
     pair([user(HAIKU)], [bot("Red leaves drift and fall")], [bot("Autumn is a season.")], score_chosen=8.5,
          score_rejected=4.0)),
    ("ultrafeedback", ULTRAFEEDBACK,
     {"kind": "ranked", "format": "text", "prompt": [user("Name a prime number.")],
      "responses": [[bot("7")], [bot("9")]],
      "scores": [4.75, 1.25], "weight": 1.0, "source": "{path}:1"}),
]


def _expected(example, path):
    return {**example, "source": example["source"].format(path=path)}


@pytest.mark.parametrize("name, row, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_format_parses_and_is_detected(tmp_path, caplog, name, row, expected):
    path = write_jsonl(tmp_path / "prefs.jsonl", [row])
    summary = LoadSummary()
    with caplog.at_level(logging.WARNING, logger="prefjax.data.formats"):
        detected = list(read_examples(path, summary=summary))
    assert same(detected, [_expected(expected, path)])
    assert summary.row_format == name
    looks_like = formats.FORMATS[name].looks_like
    assert f"{path}: rows look like {name} ({looks_like}); set data.format to override" in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefjax.data.formats"):
        chosen = list(read_examples(path, row_format=name))  # named: the same example, no notice
    assert same(chosen, detected) and not caplog.messages


def test_the_notice_is_logged_once_per_source(tmp_path, caplog):
    path = write_jsonl(tmp_path / "prefs.jsonl", [SHAREGPT, SHAREGPT, SHAREGPT])
    with caplog.at_level(logging.WARNING, logger="prefjax.data.formats"):
        assert len(list(read_examples([path, path]))) == 6
    notice = (f"{path}: rows look like sharegpt (conversations + chosen/rejected or a label); "
              "set data.format to override")
    assert caplog.messages == [notice]


def test_sharegpt_system_column_and_text_responses():
    row = {"conversations": [{"from": "user", "value": "Hi"}], "system": "Be kind.", "chosen": "Hello!",
           "rejected": "Go."}
    example = formats.parse_as("sharegpt", row, Location("p.jsonl", 4))
    assert example["prompt"] == [system("Be kind."), user("Hi")]
    assert (example["chosen"], example["rejected"]) == ([bot("Hello!")], [bot("Go.")])


def test_alpaca_history_and_system_make_a_conversation():
    row = {"instruction": "And in German?", "input": "", "system": "Translate.",
           "history": [["Cat in French?", "Chat."]],
           "output": "Katze.", "kto_tag": True}
    example = formats.parse_as("alpaca", row, Location("p.jsonl", 1))
    assert example["kind"] == "unpaired" and example["label"] is True
    assert example["prompt"] == [system("Translate."), user("Cat in French?"), bot("Chat."),
                                 user("And in German?")]
    assert example["completion"] == [bot("Katze.")]


def test_field_mapping_renames_the_canonical_columns_a_format_reads(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}], "better": {"from": "gpt", "value": "Hello"},
             "worse": {"from": "gpt", "value": "Bye"}}]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    summary = LoadSummary()
    [example] = read_examples(path, fields={"chosen": "better", "rejected": "worse"}, summary=summary)
    assert summary.row_format == "sharegpt" and example["chosen"] == [bot("Hello")]


# -- ambiguity, unknown layouts, did-you-mean ---------------------------------------------------

def test_rows_that_fit_several_formats_are_an_error_even_when_skipping(tmp_path):
    row = {**SHAREGPT, "messages": [user("What is the capital of France?")], "chosen": "Paris.",
           "rejected": "Lyon."}
    path = write_jsonl(tmp_path / "both.jsonl", [row])
    with pytest.raises(AmbiguousFormatError) as err:
        list(read_examples(path, on_error="skip"))
    assert str(err.value) == (
        f"{path}, line 1: rows fit several formats: sharegpt (conversations + chosen/rejected or a label), "
        "messages (messages + chosen/rejected or a label); set data.format to the right one")
    # Naming the format settles it.
    [as_messages] = read_examples(path, row_format="messages")
    [as_sharegpt] = read_examples(path, row_format="sharegpt")
    assert as_messages["chosen"] == [bot("Paris.")]
    assert as_messages["prompt"] == [user("What is the capital of France?")]
    assert as_sharegpt["prompt"] == [user("What is the capital of France?")]


def test_specific_formats_win_over_the_ones_they_refine():
    loc = Location("p.jsonl", 1)
    assert formats.detect_row_format(UFB, loc).name == "ultrafeedback_binarized"  # also messages, trl_pair
    assert formats.detect_row_format(HH, loc).name == "hh_rlhf"  # also trl_pair
    # TRL's prompt + conversational responses (the prompt not repeated) is not H4's layout.
    trl = {"prompt": [user(HAIKU)], "chosen": [bot("a")], "rejected": [bot("b")], "score_chosen": 1,
           "score_rejected": 0}
    assert formats.detect_row_format(trl, loc).name == "trl_pair"


def test_rows_that_fit_no_format(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}, SHAREGPT])
    with pytest.raises(DataError, match=r"odd\.jsonl, line 1: cannot tell the row format from columns "
                       r"\['answer', 'question'\]: it fits none of trl_pair, .*; set data.format, and "
                       r"data.fields to name your columns"):
        list(read_examples(path))
    summary = LoadSummary()  # skipping: the next row that fits decides
    assert len(list(read_examples(path, on_error="skip", summary=summary))) == 1
    assert dict(summary.skipped) == {"unknown_format": 1} and summary.row_format == "sharegpt"


def test_check_format_did_you_mean():
    check_format("auto")
    check_format("sharegpt")
    with pytest.raises(ValueError) as err:
        check_format("sharegtp")
    assert str(err.value) == ("unknown row format 'sharegtp' (did you mean sharegpt?); known formats: "
                              "auto, trl_pair, trl_unpaired, ranked, sharegpt, messages, alpaca, hh_rlhf, "
                              "ultrafeedback_binarized, ultrafeedback, rated, helpsteer2")
    with pytest.raises(ValueError, match=r"^unknown row format 'parquet'; known formats: auto, "):
        check_format("parquet")
    with pytest.raises(ValueError, match="did you mean ultrafeedback_binarized"):
        list(iter_parse([], row_format="ultrafeedback_binarised"))


# -- rows that do not fit the chosen format: file, line and field --------------------------------

BAD = [
    ("sharegpt", {"messages": [user("Hi")], "chosen": "a", "rejected": "b"}, "missing_field",
     ("field 'conversations': missing (row has columns ['chosen', 'messages', 'rejected']); is "
      "data.format='sharegpt' right?")),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "x"}],
                  "chosen": "a", "rejected": "b"}, "bad_role",
     "field 'conversations[1].from': unknown speaker 'narrator'; expected one of ['assistant', 'bard', "),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}],
                  "chosen": {"role": "assistant", "content": "a"}, "rejected": "b"}, "wrong_type",
     ("field 'chosen': a sharegpt message must be a dict with 'from' and 'value', got keys "
      "['content', 'role']")),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
     "missing_field",
     ("field 'chosen': missing: conversations rows need chosen + rejected (pairs) or a label / kto_tag "
      "(unpaired); row has columns ['conversations']")),
    ("messages", {"messages": [{"role": "human", "content": "Hi"}], "chosen": "a", "rejected": "b"},
     "bad_role",
     "field 'messages[0].role (prompt)': role must be one of ('system', 'user', 'assistant', 'tool'), got 'human'"),
    ("alpaca", {**ALPACA_FARM, "preference": 0}, "bad_label",
     "field 'preference': must be 1 (output_1 is better) or 2 (output_2 is better), got 0"),
    ("alpaca", {**ALPACA_FARM, "output_1": "  "}, "empty_response", "field 'output_1 (chosen)': empty"),
    ("alpaca", {"instruction": "Hi", "output": "Hello"}, "missing_field",
     "field 'label': missing: an alpaca row with one output is preference data only with a label"),
    ("hh_rlhf", {**HH, "rejected": "Assistant said: no"}, "bad_role",
     "field 'rejected': dialogue text must start with a 'Human:' turn"),
    ("ultrafeedback_binarized", {**UFB, "rejected": UFB["chosen"]}, "identical_responses",
     "field 'rejected': identical to chosen"),
    ("ultrafeedback", {**ULTRAFEEDBACK, "completions": [ULTRAFEEDBACK["completions"][0],
                                                        {"response": "9", "fine-grained_score": "N/A"}]},
     "bad_score", "field 'completions[1].fine-grained_score': must be a number, got 'N/A'"),
    ("trl_unpaired", SHAREGPT_KTO, "missing_field", "field 'completion': missing (row has columns"),
]


@pytest.mark.parametrize("name, row, reason, message", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_a_row_that_does_not_fit_names_file_line_and_field(tmp_path, name, row, reason, message):
    good = next(c[1] for c in CASES if c[0] == name)
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        list(read_examples(path, row_format=name))
    assert str(err.value).startswith(f"{path}, line 2: {message}")
    assert err.value.reason == reason
    summary = LoadSummary()
    assert len(list(read_examples(path, row_format=name, on_error="skip", summary=summary))) == 1
    assert dict(summary.skipped) == {reason: 1}


def test_one_kind_per_source(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT, SHAREGPT_KTO])
    with pytest.raises(DataError, match=r"line 2: this sharegpt row makes a unpaired example, but this "
                       r"source holds pair examples \(one kind per source\)"):
        list(read_examples(path))


# -- the trainer's streams: options reach load_source, pairs become unpaired examples ------------

def _data_config(path, loss="kto", **data):
    config = config_lib.trainer_config()
    config.loss_name = loss
    config.data.source = str(path)
    for key, value in data.items():
        config.data[key] = value
    return config


def test_pairs_become_unpaired_examples_for_an_unpaired_loss(tmp_path, caplog):
    path = write_jsonl(tmp_path / "prefs.jsonl", [SHAREGPT, SHAREGPT_2])
    config = _data_config(path, batch_size=4, max_len=64, num_epochs=1, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="prefjax.data.streams"):
        source, summary = streams.load_examples(config, str(path), kind="unpaired", train=True)
    notes = [r.getMessage() for r in caplog.records if r.name == "prefjax.data.streams"]
    assert notes == [("data: 2 pairs -> 4 unpaired examples (chosen desirable, rejected undesirable) for "
                      "loss 'kto'")]
    assert len(source) == 4 and summary.row_format == "sharegpt"
    examples = [source[i] for i in range(4)]
    assert [e["label"] for e in examples] == [True, False, True, False]
    assert [e["completion"] for e in examples[:2]] == [[bot("Paris.")], [bot("Lyon.")]]
    assert all(e["kind"] == "unpaired" and e["prompt"] == [user("What is the capital of France?")]
               for e in examples[:2])
    assert examples[1]["source"] == f"{path}:1 (rejected)" and source[-1]["label"] is False
    with pytest.raises(IndexError):
        source[4]
    # Through a whole stream: batches of single responses with their labels.
    stream = streams.make_stream(config, str(path), kind="unpaired", vocab_size=1000,
                                 tokenizer=load_tokenizer(QWEN), train=True)
    batch = next(stream)
    assert batch.num_responses == 1 and sorted(batch.label.tolist()) == [0.0, 0.0, 1.0, 1.0]
    assert (stream.load_summary.row_format, stream.load_summary.examples) == ("sharegpt", 2)
    stream.close()



def test_data_of_another_kind_says_what_the_loss_needs(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [SHAREGPT_KTO])
    with pytest.raises(ValueError, match=r"data.source='.*kto.jsonl' holds unpaired examples, but loss 'dpo' "
                       r"trains on pairs \(prompt \+ chosen \+ rejected\)"):
        streams.load_examples(_data_config(path, loss="dpo"), str(path), kind="pair", train=True)


def test_data_options_reach_the_loader(tmp_path):
    rows = [{"q": "Hi", "a": "Hello", "b": "Bye"}, "{broken", {"q": "x"}]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    fields = config_lib.trainer_config().data.fields
    fields.prompt, fields.chosen, fields.rejected = "q", "a", "b"
    config = _data_config(path, loss="dpo", fields=fields, format="trl_pair", on_error="drop")  # drop = skip
    source, summary = streams.load_examples(config, str(path), kind="pair", train=True)
    assert len(source) == 1 and dict(summary.skipped) == {"bad_json": 1, "missing_field": 1}
    assert streams.data_config(config.data, per_process_batch=1, seed=0, num_epochs=1,
                               shuffle=False).pipeline.on_error == "drop"
    config.data.format = "sharegtp"
    with pytest.raises(ValueError, match="did you mean sharegpt"):
        streams.load_examples(config, str(path), kind="pair", train=True)
    config.data.format, config.data.on_error = "auto", "error"
    with pytest.raises(DataError, match=r"mapped\.jsonl, line 2: malformed JSON"):
        streams.load_examples(config, str(path), kind="pair", train=True)


def test_on_error_skip_through_a_training_run(tmp_path, caplog):
    good = [json.loads(line) for line in (FIXTURES / "data" / "pairs_chat.jsonl").read_text().splitlines()]
    path = write_jsonl(tmp_path / "prefs.jsonl", good[:2] + ["{not json", {"chosen": "only"}] + good[2:])
    config = _config(**{"model.hf_folder": str(QWEN), "data.source": str(path), "data.max_len": 128,
                        "data.buckets": 64, "total_steps": 1, "data.on_error": "skip",
                        "checkpoint.every": 100})
    with caplog.at_level(logging.WARNING):
        summary = train.run(config, str(tmp_path / "run"))
    assert summary["step"] == 1
    report = "\n".join(caplog.messages)
    assert f"{path}: 5 rows read, 3 examples; skipped 2 bad rows: bad_json=1, missing_field=1" in report
    assert f"first missing_field: {path}, line 4: field 'rejected': missing" in report


# -- python -m prefjax.data.inspect --format / --fields -----------------------------------------

def test_inspect_takes_the_data_options(tmp_path, capsys):
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT, SHAREGPT_2])
    args = ["--tokenizer", str(QWEN), "--show", "0", "--max_len", "128"]
    assert data_inspect.main([str(sharegpt), "--format", "sharegpt", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rows: sharegpt (set by --format); 2 rows read, 2 examples\n"
                          "examples: 2  kinds: {'pair': 2}")
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"question": "Hi", "a": "Hello", "b": "Bye"}, "{oops"])
    fields = ["--fields", "prompt=question,chosen=a,rejected=b"]
    assert data_inspect.main([str(mapped), *fields, "--on_error", "skip", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rows: trl_pair (detected); 2 rows read, 1 examples; skipped 1 bad rows: "
                          "bad_json=1")
    assert data_inspect.main([str(mapped), *fields, *args]) == 2
    assert capsys.readouterr().err == (f"error: {mapped}, line 2: malformed JSON: Expecting property name "
                                       "enclosed in double quotes (column 2)\n")


@pytest.mark.parametrize("option, message", [
    (["--format", "sharegtp"], "argument --format: unknown row format 'sharegtp' (did you mean sharegpt?)"),
    (["--fields", "prompt"], "argument --fields: expected name=column items separated by commas"),
    (["--fields", "question=q"], "argument --fields: field mapping: unknown canonical names ['question']"),
])
def test_inspect_option_errors(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit):
        data_inspect.main([str(tmp_path / "x.jsonl"), "--tokenizer", str(QWEN), *option])
    assert message in capsys.readouterr().err
