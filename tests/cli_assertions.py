"""Running the CLI in-process, and what every refusal must look like: one `error:` line, no traceback."""

from edgetok.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert all(not line.startswith("error") for line in lines[:-1]), err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
