"""The web page in a real headless Chromium (Playwright) against uvicorn on a free port.

Needs the Playwright Python package and a Chromium at /usr/bin/chromium (Debian: apt-get install
chromium); `playwright install` is not needed. Set BLIP2_SEARCH_SCREENSHOT=/path.png to save a
screenshot of the results page.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = "pip install playwright && apt-get install -y chromium (no `playwright install` needed)"
QUERY = "a red circle on the left"
TOKEN = "browser-token-0123456789abcdef"

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing; {INSTALL}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason=f"the playwright package is missing; {INSTALL}")
pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[server,test]'")
from live_server import serving  # noqa: E402

from blip2_search.library import Library  # noqa: E402
from blip2_search.server import create_app  # noqa: E402

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 40)}
BACKGROUNDS = [(245, 245, 240), (30, 30, 40), (120, 160, 200)]


def _scene(path: Path, color: str, shape: str, left: bool, background) -> None:
    """A 240x180 picture of one coloured shape on the left or the right."""
    im = Image.new("RGB", (240, 180), background)
    draw = ImageDraw.Draw(im)
    x0 = 20 if left else 130
    box = (x0, 45, x0 + 90, 135)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(x0 + 45, 45), (x0, 135), (x0 + 90, 135)], fill=COLORS[color])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=92)


@pytest.fixture(scope="module")
def lib(tiny_itm_dir, tiny_captioner_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(1)
    for i in range(12):
        color = list(COLORS)[i % 4]
        shape = ("circle", "square", "triangle")[i % 3]
        year = 2020 + i % 3
        _scene(root / "photos" / str(year) / f"{color}-{shape}-{i:02d}.jpg", color, shape, bool(rng.integers(2)), BACKGROUNDS[i % 3])
    _scene(root / "photos" / "2022" / "back\\slash.jpg", "red", "circle", True, BACKGROUNDS[0])  # a name with a backslash
    with Library.open(root / "lib", model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=8) as library:
        assert library.index([root / "photos"]).failed == 0
    with Library.open(root / "lib") as library:
        yield library


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # a fresh temporary profile
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def base_url(lib):
    with serving(create_app(lib)) as url:
        yield url


@pytest.fixture
def page(browser, base_url):
    """A page that records every request and every console error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()


def _grid_ids(page) -> list[int]:
    return page.locator("#results li").evaluate_all("items => items.map(li => Number(li.dataset.id))")


def _wait_for_thumbnails(page) -> None:
    page.wait_for_function("() => { const imgs = [...document.querySelectorAll('#results img')];"
                           " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }", timeout=20_000)


def test_typed_query_and_enter_show_the_top_hit_first(page, lib, base_url):
    expected = lib.search(QUERY, 24, rerank=False)  # what the page asks for: k=24, rerank off
    page.goto(base_url + "/")
    assert page.evaluate("document.activeElement.id") == "q"  # focus starts in the search box
    page.keyboard.type(QUERY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#results li")
    assert _grid_ids(page)[0] == expected.hits[0].id
    assert _grid_ids(page) == [h.id for h in expected.hits]
    _wait_for_thumbnails(page)
    first = page.locator("#results li").first
    assert first.locator("img").get_attribute("alt")  # every thumbnail has alt text
    assert first.locator(".score").text_content() == f"score {expected.hits[0].score:.3f}"
    # not reranked: the score fuses the image's and the captions' ranks; the hover said "ITC" for another number
    assert expected.hits[0].score != expected.hits[0].itc
    assert first.locator(".score").get_attribute("title") == f"rank fusion of image and caption matches; ITC {expected.hits[0].itc:.3f}"
    if expected.hits[0].caption:
        assert first.locator(".caption").text_content() == expected.hits[0].caption
    assert page.locator("#status").get_attribute("aria-live") == "polite"
    assert page.locator("#status").text_content() == f"{len(expected.hits)} photos for “{QUERY}”."
    assert page.url.startswith(base_url + "/?")  # the search is bookmarkable
    if os.environ.get("BLIP2_SEARCH_SCREENSHOT"):
        page.screenshot(path=os.environ["BLIP2_SEARCH_SCREENSHOT"], full_page=True)
    assert all(u.startswith(base_url) or u.startswith(("data:", "blob:")) for u in page.requests), page.requests
    assert page.errors == []


def test_file_names_are_cut_at_slashes_only(page, lib, base_url):
    """Paths are POSIX: a backslash belongs to the file name (as do the escapes of non-UTF-8 bytes)."""
    (odd,) = [r for r in lib.metadata.get_records(range(1, 100)) if r.path.endswith("back\\slash.jpg")]
    page.goto(base_url + "/")
    page.keyboard.type(QUERY)
    page.keyboard.press("Enter")
    page.wait_for_selector(f'#results li[data-id="{odd.id}"]')
    item = page.locator(f'#results li[data-id="{odd.id}"]')
    assert item.locator(".file").text_content() == "back\\slash.jpg"
    assert item.locator(".file").get_attribute("title") == odd.path
    assert page.errors == []


def test_keyboard_only_rerank_and_path_filter(page, lib, base_url):
    expected = lib.search(QUERY, 24, rerank=True, path="*/2021/*")
    page.goto(base_url + "/")
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none", f"no visible focus on {order[-1]}"
    assert order == ["search-button", "rerank", "k", "sort", "path"]
    for _ in range(3):
        page.keyboard.press("Shift+Tab")
    page.keyboard.press("Space")  # tick "Rerank with ITM"
    assert page.is_checked("#rerank")
    for _ in range(3):
        page.keyboard.press("Tab")
    page.keyboard.type("*/2021/*")
    for _ in range(5):
        page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type(QUERY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#results li")
    assert _grid_ids(page) == [h.id for h in expected.hits]
    assert all("/2021/" in (page.locator(".file").nth(i).get_attribute("title") or "") for i in range(len(expected.hits)))
    for _ in range(20):  # past the button, the options, the filters (date fields have several stops) and the file picker
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.closest('#results') !== null"):
            break
    focused = page.evaluate("document.activeElement.getAttribute('href')")
    assert focused == f"/api/images/{expected.hits[0].id}"  # results are links, reachable by keyboard
    assert page.errors == []


def test_dropping_an_image_searches_by_it(page, lib, base_url):
    record = next(r for r in lib.metadata.get_records(k.id for k in lib.metadata.known_files().values()) if "blue-circle" in r.path)
    data = base64.b64encode(Path(record.path).read_bytes()).decode()
    page.goto(base_url + "/")
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "example.jpg", {type: "image/jpeg"}));
            document.body.dispatchEvent(new DragEvent("dragenter", {dataTransfer: dt, bubbles: true}));
            document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    page.wait_for_selector("#results li")
    assert _grid_ids(page)[0] == record.id  # the photo itself is the most similar
    assert "example.jpg" in page.locator("#status").text_content()


DROP_TEXT = """([selector, type]) => {
    const dt = new DataTransfer();
    dt.setData(type, type === "text/uri-list" ? "https://example.com/cat.jpg" : "red circle");
    return document.querySelector(selector).dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""


def test_dropping_words_or_a_web_picture_is_not_swallowed(page, base_url):
    """The page cancelled every drop: words dragged into the search box were not typed there, and a picture
    dragged from another web page (a link, not a file) did nothing, without a word."""
    page.goto(base_url + "/")
    assert page.evaluate(DROP_TEXT, ["#q", "text/plain"])  # not cancelled: the browser types the words
    assert page.locator("#error").is_hidden()
    assert not page.evaluate(DROP_TEXT, ["main", "text/uri-list"])  # cancelled (the page stays), and said why
    assert "not a file" in page.locator("#error").text_content() and page.locator("#error").is_visible()
    assert page.errors == []


def test_choosing_a_file_searches_by_it(page, lib, base_url):
    record = next(r for r in lib.metadata.get_records(k.id for k in lib.metadata.known_files().values()) if "green-square" in r.path)
    page.goto(base_url + "/?q=red")
    page.wait_for_selector("#results li")
    page.set_input_files("#example", record.path)
    page.wait_for_function("() => /^\\d+ photos? for photos like /.test(document.querySelector('#status').textContent)"
                           " && document.querySelector('#results li')")  # its results shown
    assert page.input_value("#q") == ""  # an image search uses no text: the box does not show the last query
    assert _grid_ids(page)[0] == record.id


def test_a_result_whose_file_is_gone_says_so(page, lib, base_url):
    """A thumbnail that could not load showed only a broken-image icon: nothing said the file was gone, or what to do."""
    (record,) = [r for r in lib.metadata.get_records(range(1, 100)) if r.path.endswith("back\\slash.jpg")]
    moved = Path(record.path).with_name("moved-away")
    Path(record.path).rename(moved)
    try:
        page.goto(base_url + "/?q=red+circle&path=*%2Fback*")
        page.wait_for_selector(f'#results li[data-id="{record.id}"] .why')
        assert "is gone" in page.locator(f'#results li[data-id="{record.id}"] .why').text_content()
    finally:
        moved.rename(record.path)


def test_more_like_this_searches_by_a_result(page, lib, base_url):
    """A result had no way to ask for photos like it: the user had to find its file and upload it."""
    page.goto(base_url + "/")
    page.fill("#q", QUERY)
    page.press("#q", "Enter")
    page.wait_for_selector("#results li")
    third = _grid_ids(page)[2]
    name = Path(lib.metadata.get_records([third])[0].path).name
    page.locator(f'#results li[data-id="{third}"] button.like').press("Enter")  # by keyboard
    page.wait_for_function(f"() => document.querySelector('#status').textContent.endsWith({f' photos for photos like {name}.'!r})"
                           " || !document.querySelector('#error').hidden")
    assert page.locator("#error").is_hidden()
    assert _grid_ids(page)[0] == third  # the photo itself is the most like it
    assert page.evaluate("document.activeElement.id") == "results"  # Tab goes on into the new results
    assert page.input_value("#q") == ""  # the box kept the text query, which Enter would then have run instead
    expected = [h.id for h in lib.similar(third, int(page.input_value("#k"))).hits]  # from its stored vectors: nothing uploaded
    assert _grid_ids(page) == expected
    assert not any(u.endswith("/api/search") for u in page.requests)
    assert f"like={third}" in page.url  # kept in the address: a reload (or a shared link) runs it again
    page.reload()
    page.wait_for_function(f"() => document.querySelector('#status').textContent.endsWith({' photos for photos like photo %d.' % third!r})")
    assert _grid_ids(page) == expected
    page.go_back()  # to the text search it came from
    page.wait_for_function(f"() => document.querySelector('#status').textContent.includes({QUERY!r})")
    assert page.input_value("#q") == QUERY
    page.go_forward()
    page.wait_for_function(f"() => document.querySelector('#status').textContent.endsWith({' photos for photos like photo %d.' % third!r})")
    page.goto(base_url + "/?like=abc")
    assert "like=abc (a photo's id)" in page.locator("#error").text_content()
    assert page.errors == []


def test_the_same_file_chosen_again_searches_again(page, lib, base_url):
    record = next(r for r in lib.metadata.get_records(k.id for k in lib.metadata.known_files().values()) if "green-square" in r.path)
    page.goto(base_url + "/?q=red")
    page.wait_for_selector("#results li")
    page.set_input_files("#example", record.path)
    page.wait_for_function("() => /^\\d+ photos? for photos like /.test(document.querySelector('#status').textContent)"
                           " && document.querySelector('#results li')")  # its results shown
    assert page.input_value("#q") == ""  # an image search uses no text: the box does not show the last query
    posts = lambda: sum(1 for u in page.requests if u.endswith("/api/search"))  # noqa: E731
    before = posts()
    page.set_input_files("#example", record.path)
    page.wait_for_function(f"() => performance.getEntriesByType('resource').filter(e => e.name.endsWith('/api/search')).length > {before}")
    assert posts() > before


def test_back_returns_to_the_previous_search_and_links_keep_their_settings(page, lib, base_url):
    page.goto(base_url + "/")
    for text in ("red circle", "blue square"):
        page.fill("#q", text)
        page.press("#q", "Enter")
        page.wait_for_selector("#results li")
    page.go_back()
    page.wait_for_function("() => document.querySelector('#q').value === 'red circle'")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('red circle')")
    page.goto(base_url + "/?q=red&k=10")  # a k the menu does not list
    page.wait_for_selector("#results li")
    assert page.locator("#k").input_value() == "10" and page.locator("#results li").count() <= 10
    page.goto(base_url + "/?q=red&after=2021-13-01")  # not a date: said, not silently dropped
    page.wait_for_selector("#error:not([hidden])")
    assert "after=2021-13-01" in page.locator("#error").text_content() and page.locator("#results li").count() == 0
    assert page.errors == []


def test_sort_by_date_is_a_setting_of_the_page_and_of_its_links(page, lib, base_url):
    """The API sorts by date (oldest first, as search --sort date), but the page had no such setting and
    refused a link with sort=date as "not a setting of this page"."""
    expected = lib.search(QUERY, 12, rerank=False, sort="date")
    page.goto(base_url + "/")
    page.select_option("#k", "12")
    page.select_option("#sort", "date")
    page.fill("#q", QUERY)
    page.press("#q", "Enter")
    page.wait_for_selector("#results li")
    assert "sort=date" in page.url and any("/api/search?" in u and "sort=date" in u for u in page.requests)
    assert _grid_ids(page) == [h.id for h in expected.hits]
    assert page.get_attribute("#results", "aria-label") == "Results, oldest first"  # a screen reader hears the order
    page.goto(page.url)  # the link restores the order
    page.wait_for_selector("#results li")
    assert page.locator("#sort").input_value() == "date" and page.locator("#error").is_hidden()
    page.goto(base_url + "/?q=red&sort=newest")
    page.wait_for_selector("#error:not([hidden])")
    assert "sort=newest" in page.locator("#error").text_content() and page.locator("#results li").count() == 0
    assert page.errors == []


def test_show_more_asks_for_more_results_and_focuses_the_first_new_one(page, lib, base_url):
    """The grid ended after k results with no way on: more meant finding the Results menu and searching again."""
    page.goto(base_url + "/?q=red+circle&k=6&rerank=false")
    page.wait_for_selector("#results li")
    assert page.locator("#results li").count() == 6
    page.locator("#more").press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#results li').length > 6")
    assert _grid_ids(page) == [h.id for h in lib.search("red circle", 12, rerank=False).hits]  # the menu's next: 12
    assert "k=12" in page.url and page.locator("#k").input_value() == "12"
    assert page.evaluate("document.activeElement.closest('li').dataset.id") == str(_grid_ids(page)[6])
    page.locator("#more").click()  # 24 asked for: all 13 photos, the last of them
    page.wait_for_function("() => document.querySelectorAll('#results li').length === 13")
    assert page.locator("#more").is_hidden()
    assert page.errors == []


def test_show_more_by_date_focuses_the_first_new_result_not_the_k_plus_first(browser, tiny_itm_dir, tmp_path):
    """Sorted by date, the results Show more adds fall between those shown before: focusing result k + 1 skipped new
    ones (here the k best are the newest photos, so after Show more they come last)."""
    picture = Image.new("RGB", (240, 180), BACKGROUNDS[0])
    ImageDraw.Draw(picture).ellipse((20, 45, 110, 135), fill=COLORS["red"])
    (tmp_path / "photos").mkdir()
    for i in range(8):  # the same picture: tied scores, ranked by id; p0 (the first id) is the newest
        exif = Image.Exif()
        exif[0x0132] = f"2023:07:{20 - i:02d} 12:00:00"
        picture.save(tmp_path / "photos" / f"p{i}.jpg", quality=92, exif=exif)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as library:
        assert library.index([tmp_path / "photos"]).failed == 0
        best = library.search(QUERY, 3, rerank=False).hits
        by_date = library.search(QUERY, 8, rerank=False, sort="date").hits
        assert [h.id for h in by_date[-3:]] == sorted((h.id for h in best), key=lambda i: -i)  # the 3 best are the newest
        with serving(create_app(library)) as url:
            page = browser.new_page()
            try:
                page.goto(url + "/?q=" + QUERY.replace(" ", "+") + "&k=3&sort=date&rerank=false")
                page.wait_for_selector("#results li")
                page.locator("#more").click()
                page.wait_for_function("() => document.querySelectorAll('#results li').length === 8")
                assert _grid_ids(page) == [h.id for h in by_date]
                assert page.evaluate("document.activeElement.closest('li').dataset.id") == str(by_date[0].id)  # the oldest: new
            finally:
                page.close()


def test_a_like_link_without_k_runs_with_the_results_menus_count(page, lib, base_url):
    """A shared /?like=ID link without k asked the server's default (10) while the menu said 24, and Show more
    read k as 0: it stayed under 13 results and asked for 12 next. The link now runs as the form reads it."""
    target = _grid_ids_of(lib)[0]
    page.goto(base_url + f"/?like={target}")
    page.wait_for_function("() => document.querySelector('#status').textContent.endsWith(' photos for photos like photo %d.')" % target)
    assert page.locator("#k").input_value() == "24"
    assert page.locator("#results li").count() == 13  # every photo of the library: nothing more to show
    assert page.locator("#more").is_hidden()
    assert "k=24" in page.url and f"like={target}" in page.url
    assert page.errors == []


def _grid_ids_of(library) -> list[int]:
    return [h.id for h in library.search(QUERY, 13, rerank=False).hits]


def test_back_and_forward_entries_are_titled_by_their_search_and_the_start_is_as_opened(page, base_url):
    """Every history entry was titled "blip2-search" (the Back menu could not tell them apart), and Back to the
    page as first opened left a blank status line instead of its prompt."""
    page.goto(base_url + "/")
    prompt = page.locator("#status").text_content()
    for text in ("red circle", "blue square"):
        page.fill("#q", text)
        page.press("#q", "Enter")
        page.wait_for_selector("#results li")
        assert page.title() == f"“{text}” - blip2-search"
    page.go_back()
    page.wait_for_function("() => document.title.startsWith('“red circle”')")
    page.go_back()
    page.wait_for_function("() => document.querySelectorAll('#results li').length === 0")
    assert page.title() == "blip2-search" and page.locator("#status").text_content() == prompt
    assert page.errors == []


def test_opening_a_search_link_adds_one_history_entry(page, base_url):
    """Back from /?q=... must leave it: the restored search rewrote the address with pushState (Back twice)."""
    page.goto(base_url + "/")
    before = page.evaluate("() => history.length")
    page.goto(base_url + "/?q=red")
    page.wait_for_selector("#results li")
    assert page.evaluate("() => history.length") == before + 1
    assert page.evaluate("() => location.search").startswith("?k=")  # the address names every setting of the search


def test_narrow_screen_has_no_sideways_scroll(browser, base_url):
    context = browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    page.goto(base_url + "/")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    context.close()


def test_narrow_screen_wraps_a_long_unbroken_query_in_status_and_error(browser, base_url):
    """The status line repeats the query (and errors and notes may quote a path): one long word (a pasted URL)
    widened a phone's page sideways to thousands of pixels."""
    context = browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    page.goto(base_url + "/")
    page.fill("#q", '"' + "x" * 300)  # an unclosed quote: refused before any model call
    page.press("#q", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "x" * 300 in page.locator("#status").text_content()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    context.close()


def test_a_date_typed_in_part_is_named_not_ignored(page, lib, base_url):
    """A date field holding only day and month reads as "" to the page: both searches ran unfiltered, silently."""
    page.goto(base_url + "/")
    page.click("#after")
    page.keyboard.type("0315")  # month and day; no year
    page.fill("#q", "red circle")
    page.press("#q", "Enter")
    page.wait_for_selector("#error:not([hidden]), #results li")
    assert "Taken on or after" in page.locator("#error").text_content()
    assert page.evaluate("document.activeElement.id") == "after"
    page.evaluate("document.querySelector('#error').hidden = true")
    page.set_input_files("#example", lib.metadata.get_records([1])[0].path)  # an image search: refused the same way
    page.wait_for_selector("#error:not([hidden]), #results li")
    assert "Taken on or after" in page.locator("#error").text_content()
    assert not any("/api/search" in u for u in page.requests) and page.locator("#results li").count() == 0
    assert page.errors == []


def test_server_error_message_is_shown(page, base_url):
    page.goto(base_url + "/")
    page.fill("#q", '"unclosed')
    page.press("#q", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "unclosed quote" in page.locator("#error").text_content()
    assert page.locator("#error").get_attribute("role") == "alert"


def test_token_login_in_the_browser(browser, lib):
    with serving(create_app(lib, token=TOKEN)) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/")
        page.fill("#q", QUERY)
        page.press("#q", "Enter")
        page.wait_for_selector("#token-form:not([hidden])")
        assert "token" in page.locator("#error").text_content()
        page.fill("#token", "wrong-token-wrong-token")
        page.press("#token", "Enter")
        page.wait_for_function("() => document.querySelector('#error').textContent.includes('not accepted')")
        assert "wrong-token" not in page.url and "bad-token" not in page.url
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
        page.wait_for_selector("#results li")  # the search typed before signing in runs again
        assert page.locator("#token-form").is_hidden()
        assert TOKEN not in page.url
        page.fill("#q", QUERY)
        page.press("#q", "Enter")
        page.wait_for_selector("#results li")
        _wait_for_thumbnails(page)  # the cookie lets <img> tags through
        assert _grid_ids(page)[0] == lib.search(QUERY, 24, rerank=False).hits[0].id
        context.close()


def test_signing_in_keeps_the_search_the_page_was_opened_with(browser, lib):
    """/?q=red&k=12 on a token server showed the token form, and signing in went to / without the search;
    after a wrong token the focus stayed on the page, not in the token field."""
    with serving(create_app(lib, token=TOKEN)) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/?q=red&k=12")
        page.wait_for_selector("#token-form:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "token"
        page.fill("#token", "wrong-token-wrong-token")
        page.press("#token", "Enter")
        page.wait_for_function("() => document.querySelector('#error').textContent.includes('not accepted')")
        assert page.evaluate("document.activeElement.id") == "token"  # ready for the next try
        assert page.locator("#q").input_value() == "red" and page.locator("#k").input_value() == "12"
        assert "q=red" in page.url and "k=12" in page.url and "token" not in page.url
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
        page.wait_for_selector("#results li")
        assert "q=red" in page.url and "k=12" in page.url and TOKEN not in page.url
        assert page.locator("#results li").count() == min(12, len(lib.search("red", 12, rerank=False).hits))
        assert page.locator("#token-form").is_hidden()
        context.close()


HOLD_SEARCHES = """
(() => {
  const realFetch = window.fetch;
  window.heldSearches = [];
  window.fetch = (url, options) => {
    if (!String(url).includes("/api/search")) return realFetch(url, options);
    return new Promise((resolve, reject) => {
      options.signal.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
      window.heldSearches.push(() => realFetch(url, options).then(resolve, reject));
    });
  };
})();
"""


def test_only_the_latest_search_clears_aria_busy(page, base_url):
    """The search a newer one aborted ended in its finally, clearing aria-busy while the newer one still ran."""
    page.add_init_script(HOLD_SEARCHES)
    page.goto(base_url + "/")
    for text in ("red circle", "blue square"):
        page.fill("#q", text)
        page.press("#q", "Enter")
    page.wait_for_function("() => window.heldSearches.length === 2")
    page.evaluate("() => new Promise(r => setTimeout(r, 100))")  # the aborted search has ended by now
    assert page.locator("#results").get_attribute("aria-busy") == "true"
    page.evaluate("() => window.heldSearches[1]()")
    page.wait_for_selector("#results li")
    page.wait_for_function("() => !document.querySelector('#results').hasAttribute('aria-busy')")
    assert "blue square" in page.locator("#status").text_content()
    assert page.errors == []


def test_back_to_a_link_with_bad_settings_clears_the_results(page, base_url):
    """Back to an entry whose settings the page cannot use showed the error over the previous entry's results."""
    page.goto(base_url + "/?q=red&after=2021-13-01")
    page.wait_for_selector("#error:not([hidden])")
    page.fill("#q", "blue square")
    page.press("#q", "Enter")
    page.wait_for_selector("#results li")
    page.go_back()
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('after=2021-13-01')")
    assert page.locator("#results li").count() == 0
    assert "blue square" not in page.locator("#status").text_content()
    assert page.errors == []


def test_a_link_with_the_apis_settings_is_read_as_the_api_reads_them(page, base_url):
    """A link with rerank=1 (the API's true) ran without rerank, and rerank_k= or fusion= (settings the page does not
    have) were dropped without a word: the page's search then differed from the link's."""
    page.goto(base_url + "/?q=red+circle&rerank=1&k=6")
    page.wait_for_selector("#results li")
    assert page.locator("#rerank").is_checked()
    assert any("/api/search?" in u and "rerank=true" in u for u in page.requests)
    for setting in ("rerank_k=4", "fusion=false", "rerank=maybe"):
        page.goto(base_url + f"/?q=red&{setting}")
        page.wait_for_selector("#error:not([hidden])")
        assert setting.split("=")[0] in page.locator("#error").text_content() and page.locator("#results li").count() == 0
    assert page.errors == []
