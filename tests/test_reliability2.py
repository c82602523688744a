"""Reliability, second round (issue 18): outputs that are not regular files, full disks, weights that would compute
nonsense, changed data on resume, flag abuse, hostile stdin, signals in teardown, folders of junk.

Each test covers a class of failure through the real CLI where it can, and checks the promise: one line on stderr,
the exit status of the README's table, nothing the user made replaced or left half-written.
"""

from conftest import ROOT, invoke, one_line_error

# ----------------------------------------------------------------------------------------------
# 1, 14, 18: every output path goes through one helper


# ----------------------------------------------------------------------------------------------
# 5, 8, 11, 15: weights that would compute nonsense, or cost far more than they are


# ----------------------------------------------------------------------------------------------
# 13: every numeric flag of every command is range-checked at the boundary (exit 2)


# ----------------------------------------------------------------------------------------------
# 4: resume on different data


# ----------------------------------------------------------------------------------------------
# 12: stdin bytes, and loader workers that stop whatever ends the command


# ----------------------------------------------------------------------------------------------
# 16: SIGTERM at any moment, teardown included, is exit 143 with temporaries gone


# ----------------------------------------------------------------------------------------------
# 17: a folder of junk is read once per process, not once per image


# ----------------------------------------------------------------------------------------------
# Done by the lead (2, 3, 7, 9): checked here through the CLI


def test_a_class_left_without_a_readable_image_is_refused(tmp_path, tiny_weights):
    data = tmp_path / "labelled"
    (data / "cats").mkdir(parents=True)
    (data / "junk").mkdir()
    for i, photo in enumerate(sorted((ROOT / "examples" / "images").glob("*.jpg"))[:5]):
        (data / "cats" / f"{i}.jpg").write_bytes(photo.read_bytes())
        (data / "junk" / f"{i}.jpg").write_bytes(b"not an image")
    one_line_error(invoke("probe", data, "-w", tiny_weights, "--workers", "0"), 1, "junk")
