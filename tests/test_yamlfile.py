"""The YAML files users write: duplicate keys refused with both lines, 1e3 read as a number,
unreadable and non-UTF-8 files refused in one error naming the file."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.net.topology import load_topology
from testbed.yamlfile import parse_yaml, read_yaml


def test_duplicate_keys_name_the_path_and_both_lines():
    with pytest.raises(ConfigError) as e:
        parse_yaml("name: a\ninput:\n  tokens: 17\n  seed: 0\n  tokens: 33\n", "exp.yaml")
    assert e.value.field == "input.tokens" and "lines 3 and 5" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_yaml("methods: [single]\nname: x\nmethods: [astra]\n", "exp.yaml")
    assert e.value.field == "methods" and "lines 1 and 3" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_yaml("links:\n  - {a: h1, b: s1, a: h2}\n", "t.yaml")
    assert e.value.field == "links[0].a"


@pytest.mark.parametrize("text,value", [("1e3", 1000.0), ("-2.5E-3", -0.0025), ("1e+3", 1000.0),
                                        ("1.5e2", 150.0), ("7", 7), ("0.5", 0.5), ("e3", "e3"), ("1e", "1e")])
def test_exponent_numbers_are_numbers(text, value):
    got = parse_yaml(f"x: {text}\n", "f.yaml")["x"]
    assert got == value and type(got) is type(value)


def test_unreadable_and_binary_files(tmp_path):
    binary = tmp_path / "exp.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00x\n")
    with pytest.raises(ConfigError, match="not UTF-8 text .*byte 0xff at offset 6"):
        read_yaml(binary)
    with pytest.raises(ConfigError, match="a readable YAML file"):
        read_yaml(tmp_path)  # a directory cannot be read as a file
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        read_yaml(bad)


def test_topology_files_are_read_the_same_way(tmp_path):
    t = tmp_path / "pair.yaml"
    t.write_text("name: pair\nhosts: [h1, h2]\nhosts: [h3]\nlinks: []\n")
    with pytest.raises(ConfigError, match="hosts: got 'given twice \\(lines 2 and 3\\)'"):
        load_topology(t)
