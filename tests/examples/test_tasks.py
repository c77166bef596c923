"""The generated example tasks: seeded, and every completion is the right answer."""

from examples.tasks import make


def test_tasks_are_seeded_and_correct():
    assert make("sort", 50, seed=3) == make("sort", 50, seed=3) != make("sort", 50, seed=4)
    for r in make("sort", 50):
        xs = [int(x) for x in r["prompt"].split(":")[1].split()]
        assert r["completion"] == " ".join(map(str, sorted(xs))) and 4 <= len(xs) <= 6
    for r in make("acronym", 50):
        words = r["prompt"].split(":")[1].split()
        assert r["completion"] == "".join(w[0].upper() for w in words)
