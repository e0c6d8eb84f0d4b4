"""app.py as a user runs it (`python app.py --port P`), called through its API with gradio_client: the images
are right by the Shapes judge, bad requests are messages and the server keeps serving, overlapping requests
both finish, the flow prior and variations work, and it listens on localhost only by default."""
import os
import socket

import gradio_client
import pytest
from PIL import Image

@pytest.fixture(scope="module")
def server(app_server):
    return app_server


def judged(item):
    from evaluation.judge import judge

    return judge(Image.open(item["image"]).convert("RGB"))


def test_generate_returns_the_prompt_as_the_judge_sees_it(server):
    client, _ = server
    items = client.predict(prompt="a large red circle in the top left", model="Shapes world", prior="gpt",
                           candidates=16, keep=4, seed=3, api_name="/generate")
    assert len(items) == 4
    scores = [float(item["caption"].split()[1]) for item in items]
    assert scores == sorted(scores, reverse=True)
    verdicts = [judged(item).describe() for item in items]
    assert sum(v == "large red circle, top left" for v in verdicts) >= 3, verdicts
    again = client.predict(prompt="a large red circle in the top left", model="Shapes world", prior="gpt",
                           candidates=16, keep=4, seed=3, api_name="/generate")
    assert [i["caption"] for i in again] == [i["caption"] for i in items]  # the same seed, the same images


@pytest.mark.parametrize("kw,message", [
    ({"prompt": "   "}, "type a prompt first"),
    ({"prompt": "a red circle", "candidates": 0}, "less than minimum value 1"),  # the slider's own check
    ({"prompt": "a red circle", "candidates": 2, "keep": 3}, "cannot be more than the candidates"),
    ({"prompt": "a red circle", "guidance": 50}, "greater than maximum value 5"),
    ({"prompt": "a red circle", "top_p": 0}, "less than minimum value 0.05"),
    ({"prompt": "a red circle", "seed": -1}, "seed must be a whole number from 0"),
    ({"prompt": "a red circle", "top_k": -1}, "top k must be a whole number from 0"),
    ({"prompt": "a red circle", "prior": "flow", "top_k": 5}, "set them to 0 and 1 for the flow prior"),
])
def test_a_bad_request_is_a_message_and_the_server_keeps_serving(server, kw, message):
    client, _ = server
    with pytest.raises(Exception, match=message):
        client.predict(**{"model": "Shapes world", "candidates": 4, "keep": 2, **kw}, api_name="/generate")
    items = client.predict(prompt="a blue square", model="Shapes world", candidates=4, keep=2, api_name="/generate")
    assert len(items) == 2


def test_two_overlapping_requests_both_finish(server):
    client, _ = server
    jobs = [client.submit(prompt=p, model="Shapes world", candidates=8, keep=2, api_name="/generate")
            for p in ("a green triangle", "a yellow diamond")]
    results = [job.result(timeout=120) for job in jobs]
    assert [len(r) for r in results] == [2, 2]
    assert [judged(r[0]).describe().split()[1] for r in results] == ["green", "yellow"]


def test_flow_prior_variations_and_interpolation_through_the_api(server, tmp_path):
    client, _ = server
    items = client.predict(prompt="a large purple square in the bottom right", model="Shapes world", prior="flow",
                           flow_steps=2, candidates=8, keep=2, api_name="/generate")
    assert judged(items[0]).describe() == "large purple square, bottom right"
    picture = tmp_path / "red.png"
    Image.open(items[0]["image"]).save(picture)
    varied = client.predict(gradio_client.handle_file(str(picture)), "Shapes world", "gpt", 8, 2, 1.0, 0, 8,
                            api_name="/variations")
    assert judged(varied[0]).describe().rstrip(",").split(",")[0].split()[1:] == ["purple", "square"]
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    with pytest.raises(Exception):
        client.predict(gradio_client.handle_file(str(not_a_picture)), "Shapes world", "gpt", 8, 2, 1.0, 0, 8,
                       api_name="/variations")
    strip = client.predict("a red circle", "a blue circle", "Shapes world", "gpt", 3, 1.0, 0, 8,
                           api_name="/interpolate")
    assert [i["caption"] for i in strip] == ["0.00", "0.50", "1.00"]


def test_it_listens_on_localhost_only_by_default(server):
    _, port = server
    tables = [t for t in ("/proc/net/tcp", "/proc/net/tcp6") if os.path.exists(t)]
    if tables:  # Linux: the listening socket's own address (state 0A = LISTEN)
        listening = [line.split()[1] for t in tables for line in open(t).read().splitlines()[1:]
                     if line.split()[3] == "0A" and int(line.split()[1].rsplit(":", 1)[1], 16) == port]
        assert listening == ["0100007F:" + f"{port:04X}"], listening  # 127.0.0.1 only, no 0.0.0.0 or ::
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    outside = [a for a in addresses if not a.startswith("127.")]
    for address in outside:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=1).close()


def test_mistakes_on_the_command_line_end_in_one_line(forkrun):
    from tests.conftest import assert_one_error

    assert_one_error(forkrun("app.py", "--vqgan", "v.pt"), "go together")
    assert_one_error(forkrun("app.py", "--models", "/nonexistent"), "no models in /nonexistent")
    assert_one_error(forkrun("app.py", "--port", "0"), "--port")
