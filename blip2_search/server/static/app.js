// The blip2-search page: a text search form, search by a dropped or chosen image, and a result grid.
// Talks only to this server's /api; builds the DOM with textContent (never HTML from data).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const queryInput = $("q");
  const statusLine = $("status");
  const errorLine = $("error");
  const notesList = $("notes");
  const grid = $("results");
  const dropZone = $("drop-zone");
  const exampleInput = $("example");
  const tokenForm = $("token-form");
  const FIELDS = ["path", "after", "before"];
  const MAX_UPLOAD_BYTES = 20 * 1024 * 1024;
  const MAX_K = 200;
  const moreButton = $("more");
  const PROMPT = statusLine.textContent;  // what the page says before any search
  const TITLE = document.title;
  let inFlight = null;
  let latestSearch = 0;  // only the latest search may clear aria-busy: an aborted one ends while its successor runs

  function setStatus(text) {
    statusLine.textContent = text;
  }

  function showError(message) {
    errorLine.textContent = message;
    errorLine.hidden = !message;
  }

  function showNotes(notes) {
    notesList.replaceChildren(...(notes || []).map((n) => {
      const li = document.createElement("li");
      li.textContent = n;
      return li;
    }));
    notesList.hidden = !notes || notes.length === 0;
  }

  function filterParams() {
    const params = new URLSearchParams();
    params.set("k", $("k").value);
    if ($("sort").value !== "score") params.set("sort", $("sort").value);
    for (const name of FIELDS) {
      const value = $(name).value.trim();
      if (value) params.set(name, value);
    }
    return params;
  }

  // A date typed only in part reads as "" (no filter): say so, rather than search all dates.
  function incompleteDate() {
    const field = ["after", "before"].map($).find((input) => input.validity.badInput);
    if (!field) return false;
    clearResults();
    showError(`“${field.labels[0].textContent.trim()}” is not a whole date; finish its day, month and year, or clear it.`);
    field.focus();
    return true;
  }

  // fetch that returns parsed JSON or throws an Error carrying the server's one-line message.
  async function callApi(url, options) {
    if (inFlight) inFlight.abort();
    inFlight = new AbortController();
    const response = await fetch(url, { credentials: "same-origin", signal: inFlight.signal, ...options });
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  // The Error carrying the server's one-line message for an answer that is not ok; a 401 shows the token form.
  async function failure(response) {
    const body = await response.json().catch(() => null);
    if (response.status === 401) {
      tokenForm.hidden = false;
      $("token").focus();
    }
    return new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
  }

  // What a failed fetch says: its own TypeError ("Failed to fetch") means no answer came at all.
  function problem(err) {
    return err instanceof TypeError ? "Cannot reach the server; is blip2-search serve still running?" : err.message;
  }

  function baseName(path) {
    const parts = path.split("/");  // paths are POSIX; a backslash is part of a name (or of an escaped byte)
    return parts[parts.length - 1] || path;
  }

  function hitItem(hit, rank, reranked) {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = String(hit.id);

    const link = document.createElement("a");
    link.href = `/api/images/${hit.id}`;
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.src = `/api/images/${hit.id}/thumbnail`;
    img.alt = hit.caption ? hit.caption : `Photo ${baseName(hit.path)}`;
    img.loading = rank <= 24 ? "eager" : "lazy";
    img.decoding = "async";
    img.addEventListener("error", () => whyMissing(li, link, img.src), { once: true });
    link.append(img);

    const meta = document.createElement("p");
    meta.className = "meta";
    const rankEl = document.createElement("span");
    rankEl.className = "rank";
    rankEl.textContent = `#${rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(3)}`;
    if (reranked && hit.itm_logit !== null) {
      score.title = `ITM logit ${hit.itm_logit.toFixed(3)} + ITC ${hit.itc.toFixed(3)}`;
    } else if (hit.score !== hit.itc) {  // ranks of the image match and of the caption matches, fused (search --fusion)
      score.title = `rank fusion of image and caption matches; ITC ${hit.itc.toFixed(3)}`;
    } else {
      score.title = `ITC ${hit.itc.toFixed(3)}`;
    }
    meta.append(rankEl, " ", score);
    if (hit.taken_at) {
      const taken = document.createElement("time");
      taken.dateTime = hit.taken_at;
      taken.textContent = hit.taken_at.slice(0, 10);
      meta.append(" ", taken);
    }

    const caption = document.createElement("p");
    caption.className = "caption";
    caption.textContent = hit.caption || "";
    const file = document.createElement("p");
    file.className = "file";
    file.textContent = baseName(hit.path);
    file.title = hit.path;

    const like = document.createElement("button");
    like.type = "button";
    like.className = "like";
    like.textContent = "More like this";
    like.setAttribute("aria-label", `More photos like ${baseName(hit.path)}`);
    like.addEventListener("click", () => searchLike(hit));

    li.append(link, meta);
    if (hit.caption) li.append(caption);
    li.append(file, like);
    return li;
  }

  // A thumbnail that did not load: its card says why (the server's message: the file is gone, changed, refused).
  async function whyMissing(li, link, url) {
    li.classList.add("missing");
    const why = document.createElement("p");
    why.className = "why";
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      why.textContent = response.ok ? "The thumbnail could not be shown; open the photo instead." : (await failure(response)).message;
    } catch (err) {
      why.textContent = problem(err);
    }
    link.after(why);
  }

  // `again(params, shown)` runs the shown search with other settings: "Show more" asks it for more results, and
  // moves the focus to the first of them not `shown` before (with sort=date the new ones fall between the old).
  function render(result, label, reranked, params, again) {
    const hits = result.results || [];
    grid.replaceChildren(...hits.map((h, i) => hitItem(h, i + 1, reranked)));
    grid.setAttribute("aria-label", params.get("sort") === "date" ? "Results, oldest first" : "Results, best first");
    const k = Number(params.get("k"));
    moreButton.hidden = hits.length < k || k >= MAX_K;
    moreButton.onclick = () => {
      const more = new URLSearchParams(params);
      const next = [...$("k").options].map((o) => Number(o.value)).sort((a, b) => a - b).find((n) => n >= 2 * k) || MAX_K;
      more.set("k", String(next));
      setK(next);
      again(more, new Set(hits.map((h) => h.id)));
    };
    showNotes(result.notes);  // the server's: also which hits were reranked when only some were
    const count = hits.length === 1 ? "1 photo" : `${hits.length} photos`;
    setStatus(hits.length ? `${count} for ${label}.` : `No photos matched ${label}.`);
  }

  function clearResults() {
    grid.replaceChildren();
    moreButton.hidden = true;
    showNotes([]);
    setStatus("");
  }

  // `params`: the search's settings (k, filters...); `again`: see render. `shown`: the ids of the results shown before
  // (Show more), the first result not among them is focused.
  async function runSearch(label, request, params, again, shown = null) {
    const search = ++latestSearch;
    showError("");
    grid.setAttribute("aria-busy", "true");
    moreButton.hidden = true;  // it would ask for more of the results this search replaces
    document.title = `${label} - ${TITLE}`;  // tabs and the Back menu tell the searches apart
    setStatus(`Searching for ${label}…`);
    try {
      render(await request(), label, $("rerank").checked, params, again);
      const first = shown && [...grid.children].find((li) => !shown.has(Number(li.dataset.id)));
      if (first) first.querySelector("a").focus();
    } catch (err) {
      if (err.name === "AbortError") return;
      clearResults();
      setStatus(`Search for ${label} failed.`);
      showError(problem(err));
    } finally {
      if (search === latestSearch) grid.removeAttribute("aria-busy");
    }
  }

  // replace: the address is already this search's (opened from a link), so it gets no new history entry.
  function searchText(replace = false) {
    const q = queryInput.value.trim();
    if (!q) {
      setStatus("Type a description first.");
      queryInput.focus();
      return;
    }
    if (incompleteDate()) return;
    const params = filterParams();
    params.set("q", q);
    params.set("rerank", $("rerank").checked ? "true" : "false");
    runText(params, replace ? "replaceState" : "pushState");
  }

  // `record`: "pushState" or "replaceState" to keep the search in the address, null where it already is (Back).
  function runText(params, record = "pushState", shown = null) {
    if (record && location.search !== `?${params}`) history[record](null, "", `/?${params}`);
    runSearch(`“${params.get("q")}”`, () => callApi(`/api/search?${params}`), params,
              (more, seen) => runText(more, "pushState", seen), shown);
  }

  function searchImage(file) {
    if (!file) return;
    const refuse = (message) => {
      clearResults();
      showError(message);
    };
    if (file.type && !file.type.startsWith("image/")) {
      refuse(`${file.name} is not an image; drop a photo (JPEG, PNG, WebP, HEIC...).`);
      return;
    }
    if (file.size > MAX_UPLOAD_BYTES) {
      refuse(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB, over the 20 MB limit; resize or re-export it.`);
      return;
    }
    if (incompleteDate()) return;
    if (location.search) history.pushState(null, "", "/");  // a reload must not rerun the last text search
    queryInput.value = "";  // the box shows no text this search does not use (Back brings the last one back)
    runImage(file, filterParams());
  }

  function runImage(file, params, shown = null) {
    const body = new FormData();
    body.append("image", file, file.name);
    for (const [name, value] of params) body.append(name, value);
    runSearch(`photos like ${file.name}`, () => callApi("/api/search", { method: "POST", body }), params,
              (more, seen) => runImage(file, more, seen), shown);
  }

  // "More like this": photos like a result, from its stored vectors (GET /api/images/ID/similar: nothing is uploaded,
  // and it works where the file is gone). The address keeps it (/?like=ID&...), so Back, reload and links rerun it.
  function searchLike(hit) {
    grid.focus();  // the button goes with the grid it is in; Tab then continues into the new results
    if (incompleteDate()) return;
    const params = filterParams();
    params.set("like", String(hit.id));
    queryInput.value = "";  // as for a search by example
    runLike(params, "pushState", null, baseName(hit.path));
  }

  // The like search of an address, with the settings as the form reads them (a link may lack k, or hold q or
  // rerank, which it does not take): as a text search from an address runs.
  function likeFrom(address, record) {
    const params = filterParams();
    params.set("like", address.get("like"));
    runLike(params, record);
  }

  function runLike(params, record = "pushState", shown = null, name = null) {
    if (record && location.search !== `?${params}`) history[record](null, "", `/?${params}`);
    const rest = new URLSearchParams(params);
    rest.delete("like");
    runSearch(`photos like ${name || `photo ${params.get("like")}`}`,
              () => callApi(`/api/images/${params.get("like")}/similar?${rest}`), params,
              (more, seen) => runLike(more, "pushState", seen, name), shown);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    searchText();
  });
  exampleInput.addEventListener("change", () => {
    searchImage(exampleInput.files[0]);
    exampleInput.value = "";  // so that choosing the same picture again (after changing a filter) searches again
  });

  // Drag and drop anywhere on the page; the example box lights up while a file is over the page.
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    dragDepth += 1;
    dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) dropZone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (event) => {
    dragDepth = 0;
    dropZone.classList.remove("dragging");
    const files = event.dataTransfer ? Array.from(event.dataTransfer.files) : [];
    if (!files.length && event.target instanceof HTMLInputElement) return;  // words dropped into a box: the browser types them
    event.preventDefault();  // else the browser would leave the page for what was dropped
    if (!files.length) {
      showError("Nothing to search by: what was dropped is not a file; drop an image file (save a picture from a web page first), "
                + "or use a result's More like this.");
      return;
    }
    searchImage(files.find((f) => !f.type || f.type.startsWith("image/")) || files[0]);
  });

  // Signing in keeps the address's search: the server drops the token from /?q=...&token=T and redirects
  // to /?q=..., which then runs (a plain GET form would send only the token).
  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const params = new URLSearchParams(location.search);
    params.delete("token");
    params.set("token", $("token").value);
    location.assign(`/?${params}`);
  });

  // Restore a search from the address bar (/?q=...), and report a token that was not accepted.
  const initial = new URLSearchParams(location.search);
  const badToken = location.hash === "#bad-token";
  if (badToken) {
    tokenForm.hidden = false;
    showError("That token was not accepted; enter the --token the server was started with.");
    history.replaceState(null, "", location.pathname + location.search);  // the search stays for the next try
    $("token").focus();
  }
  // The results menu set to k, which it gains where it does not list it (a link's k=10).
  function setK(k) {
    if (![...$("k").options].some((o) => o.value === String(k))) $("k").add(new Option(k, k));
    $("k").value = String(k);
  }

  // Fill the form from an address (/?q=...&k=...); a value the form cannot show is an error, not dropped.
  function restore(params) {
    const problems = [];
    for (const name of FIELDS) {
      const wanted = params.get(name) || "";
      $(name).value = wanted;
      if ($(name).value !== wanted) {
        $(name).value = "";
        problems.push(`${name}=${wanted} (use YYYY-MM-DD)`);
      }
    }
    const k = params.get("k");
    if (k && /^\d+$/.test(k) && Number(k) >= 1 && Number(k) <= MAX_K) {
      setK(Number(k));
    } else if (k) {
      problems.push(`k=${k} (1 to 200)`);
    }
    const sort = params.get("sort") || "score";
    if (["score", "date"].includes(sort)) {
      $("sort").value = sort;
    } else {
      problems.push(`sort=${sort} (score or date)`);
    }
    for (const name of ["min_score", "rerank_k", "fusion"]) {  // the API's, not the page's: dropped, the search would differ
      if (params.has(name)) problems.push(`${name} (not a setting of this page)`);
    }
    const like = params.get("like");
    if (like !== null && !/^[1-9]\d{0,17}$/.test(like)) problems.push(`like=${like} (a photo's id)`);
    if (like !== null && params.get("q")) problems.push("both q and like (one search at a time)");
    const rerank = (params.get("rerank") || "false").toLowerCase();  // as the API reads a boolean
    if (["true", "1", "yes", "on", "false", "0", "no", "off"].includes(rerank)) {
      $("rerank").checked = ["true", "1", "yes", "on"].includes(rerank);
    } else {
      problems.push(`rerank=${params.get("rerank")} (true or false)`);
    }
    queryInput.value = params.get("q") || "";
    if (problems.length) {
      showError(`This link has settings the page cannot use: ${problems.join(", ")}; fix them above and search again.`);
      return false;
    }
    return true;
  }

  const usable = restore(initial);
  if (badToken) {
    // shown, not run: it would only answer 401 again
  } else if (usable && initial.get("like")) {
    likeFrom(initial, "replaceState");
  } else if (usable && initial.get("q")) {
    searchText(true);
  }
  window.addEventListener("popstate", () => {
    const params = new URLSearchParams(location.search);
    showError("");
    const usable = restore(params);
    if (usable && params.get("like")) {
      likeFrom(params, null);
    } else if (usable && params.get("q")) {
      const search = filterParams();
      search.set("q", params.get("q"));
      search.set("rerank", $("rerank").checked ? "true" : "false");
      runText(search, null);
    } else {
      // no search, or settings the page cannot use (restore said so): not the results of the entry left
      if (inFlight) inFlight.abort();
      latestSearch += 1;
      grid.removeAttribute("aria-busy");
      clearResults();
      document.title = TITLE;
      if (errorLine.hidden) setStatus(PROMPT);  // back at the start: the page as it opened
    }
  });
  if (tokenForm.hidden) queryInput.focus();
})();
