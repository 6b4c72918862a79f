"""data/load.py and data/clean.py: sources, schemas, cleaning report, and clear errors."""

import json

import pytest

from data import DataError, EMBEDDED_DATASET, clean_rows, load_rows, normalize


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_embedded_dataset_is_large_and_covers_every_topic():
    rows = load_rows(None).rows
    pairs, report = clean_rows(rows, "embedded")
    assert report.kept == len(rows) >= 600
    topics = {}
    for pair in pairs:
        topics[pair.topic] = topics.get(pair.topic, 0) + 1
    for topic in ("pharmacology", "physiology", "pathology", "microbiology", "anatomy", "biochemistry", "clinical_medicine"):
        assert topics[topic] >= 50, topic
    assert topics["out_of_domain"] >= 250 and topics["borderline"] >= 60 and topics["safety"] >= 40
    ood_categories = {row["category"] for row in rows if row["topic"] == "out_of_domain"}
    assert len(ood_categories) >= 15, sorted(ood_categories)
    assert {"instruction", "input", "output", "topic"} <= set(rows[0])


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_list_and_json_lines(tmp_path, suffix):
    rows = [{"instruction": "Answer this question truthfully", "input": "What is insulin?", "output": "A peptide hormone from beta cells."}]
    as_list = write(tmp_path / f"a{suffix}", json.dumps(rows)) if suffix == ".json" else None
    as_lines = write(tmp_path / f"b{suffix}", "\n".join(json.dumps(r) for r in rows) + "\n")
    for path in filter(None, (as_list, as_lines)):
        assert load_rows(path).rows == rows


def test_csv_and_parquet(tmp_path):
    csv_path = write(tmp_path / "a.csv", 'question,answer\n"What is insulin?","A peptide hormone, from beta cells."\n')
    assert load_rows(csv_path).rows == [{"question": "What is insulin?", "answer": "A peptide hormone, from beta cells."}]
    from datasets import Dataset

    Dataset.from_list([{"question": "What is insulin?", "answer": "A peptide hormone."}]).to_parquet(str(tmp_path / "a.parquet"))
    assert load_rows(str(tmp_path / "a.parquet")).rows[0]["question"] == "What is insulin?"


def test_three_schemas():
    q, a = "What is insulin?", "A peptide hormone from beta cells."
    for rows in (
        [{"instruction": "Answer this question truthfully", "input": q, "output": a}],
        [{"question": q, "answer": a}],
        [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}],
    ):
        pairs, _ = clean_rows(rows, "t")
        assert (pairs[0].question, pairs[0].answer) == (q, a)


def test_question_is_input_never_instruction_plus_input():
    rows = [
        {"instruction": "Answer this question truthfully", "input": "What is insulin?", "output": "A peptide hormone from beta cells."},
        {"instruction": "What does the liver store glycogen for?", "input": "", "output": "To release glucose between meals."},
    ]
    pairs, _ = clean_rows(rows, "t")
    assert [p.question for p in pairs] == ["What is insulin?", "What does the liver store glycogen for?"]


def test_unknown_schema_names_columns_and_accepted_schemas():
    with pytest.raises(DataError, match=r"columns \['prompt', 'response'\] match no schema; accepted schemas: instruction/input/output; question/answer; messages"):
        clean_rows([{"prompt": "a", "response": "b"}], "t")


def test_normalize_removes_control_characters_and_collapses_whitespace():
    assert normalize("  What\x00 is\t\tthe\n\n heart?\x07 ") == "What is the heart?"


def test_cleaning_report_counts_every_drop():
    good = {"question": "What is insulin?", "answer": "A peptide hormone from beta cells."}
    rows = [
        good,
        dict(good),  # duplicate
        {"question": "Why?", "answer": "Because of many reasons."},  # short question (4 chars)
        {"question": "Is aspirin an NSAID?", "answer": "Yes."},  # bare yes
        {"question": "Is aspirin an NSAID?", "answer": "TRUE"},  # bare true
        {"question": "What is ATP?", "answer": "Energy."},  # short answer (7 chars)
        {"question": "What is ATP?"},  # missing answer
        {"question": "What is \x00 DNA?", "answer": "  Deoxyribonucleic   acid, the genome.  "},
    ]
    pairs, report = clean_rows(rows, "t")
    assert report.rows_read == 8 and report.kept == 2
    assert dict(report.dropped) == {"missing_field": 1, "short_question": 1, "short_answer": 1, "yes_no_answer": 2, "duplicate": 1}
    assert pairs[1].question == "What is DNA?" and pairs[1].answer == "Deoxyribonucleic acid, the genome."
    assert report.lines() == ["rows read 8, kept 2, dropped 6 (missing_field 1, short_question 1, short_answer 1, yes_no_answer 2, duplicate 1)"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"question": "What is insulin?", "answer": "A hormone made by beta cells."}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON row .*--skip-bad-rows"):
        load_rows(path)
    raw = load_rows(path, skip_bad_rows=True)
    assert raw.bad_rows == 1 and len(raw.rows) == 1 and raw.bad_row_examples[0].startswith("line 2:")


def test_not_utf8(tmp_path):
    path = write(tmp_path / "latin1.jsonl", '{"question": "caf\xe9?"}'.encode("latin-1"), mode="wb")
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text \(byte 0xe9 at offset 17\)"):
        load_rows(path)


def test_empty_file_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"empty\.json: file is empty"):
        load_rows(write(tmp_path / "empty.json", "  \n"))
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        load_rows(str(tmp_path / "nope.csv"))


def test_every_row_filtered_out():
    with pytest.raises(DataError, match=r"every row was filtered out \(rows read 2, kept 0, dropped 2"):
        clean_rows([{"question": "Is it?", "answer": "no"}, {"question": "Q", "answer": "A long enough answer."}], "t")


def test_missing_fields_are_counted_not_crashed():
    pairs, report = clean_rows([{"question": "What is insulin?", "answer": 42}, {"question": "What is insulin?", "answer": "A peptide hormone."}], "t")
    assert report.dropped["missing_field"] == 1 and len(pairs) == 1


def test_hub_unreachable_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"could not load dataset 'nobody/no-such-dataset' from the hub .*--data PATH"):
        load_rows("nobody/no-such-dataset")


def test_embedded_dataset_is_read_line_by_line_as_json_objects():
    lines = [line for line in EMBEDDED_DATASET.read_text(encoding="utf-8").splitlines() if line.strip()]
    raw = load_rows(None)
    assert raw.source == str(EMBEDDED_DATASET) and raw.bad_rows == 0
    assert raw.rows == [json.loads(line) for line in lines] and len(raw.rows) > 0
