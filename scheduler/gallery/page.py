"""The gallery page's HTML, CSS and script, as one `string.Template` (`$name` placeholders).

Everything is inline, so the page works from a file, from the HTTP API, offline, and under
a content security policy that loads nothing from elsewhere.
"""

from __future__ import annotations

from string import Template
from typing import Final

PAGE_TEMPLATE: Final = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
  content="default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<link rel="icon" href="data:,">
<title>$title</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f5; color: #18181b; }
  header { position: sticky; top: 0; background: #fff; padding: 12px 20px; border-bottom: 1px solid #ddd;
           display: flex; flex-wrap: wrap; gap: 12px; align-items: center; z-index: 1; }
  header h1 { font-size: 18px; margin: 0 12px 0 0; }
  header .meta { color: #555; font-size: 13px; }
  main { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 14px; padding: 20px; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 10px; display: flex;
          flex-direction: column; gap: 6px; font-size: 13px; }
  .card[hidden] { display: none; }
  .output { width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; image-rendering: pixelated;
            border-radius: 4px; }
  div.output { display: flex; align-items: center; justify-content: center; color: #888; }
  .refs { display: flex; gap: 4px; }
  .ref { width: 40px; height: 40px; object-fit: cover; border-radius: 3px; border: 1px solid #ccc; }
  div.ref { font-size: 9px; overflow: hidden; }
  .prompt { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
  .status { margin: 0; font-weight: 600; }
  .status-succeeded { color: #15803d; } .status-failed { color: #b91c1c; }
  .status-canceled { color: #6b7280; } .status-queued, .status-running { color: #a16207; }
  .error { margin: 0; color: #b91c1c; overflow-wrap: anywhere; white-space: pre-wrap; }
  dl { display: grid; grid-template-columns: auto 1fr; gap: 1px 8px; margin: 0; color: #444; }
  dt { color: #777; } dd { margin: 0; overflow-wrap: anywhere; }
</style>
</head>
<body>
<header>
  <h1>$batch_name</h1>
  <span class="meta">batch $batch_id, model set $model_set</span>
  <label>status <select id="status-filter"><option value="">all ($total)</option>$options</select></label>
  <label>prompt <input id="text-filter" type="search" placeholder="filter by prompt text"></label>
  <span id="shown-count">$total of $total shown</span>
</header>
$nav
<main id="cards">
$cards
</main>
<script>
(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  var statusFilter = document.getElementById("status-filter");
  var textFilter = document.getElementById("text-filter");
  var shown = document.getElementById("shown-count");
  function apply() {
    var status = statusFilter.value;
    var text = textFilter.value.trim().toLowerCase();
    var count = 0;
    cards.forEach(function (card) {
      var visible = (!status || card.dataset.status === status) && (!text || card.dataset.text.indexOf(text) >= 0);
      card.hidden = !visible;
      if (visible) { count += 1; }
    });
    shown.textContent = count + " of " + cards.length + " shown";
  }
  statusFilter.addEventListener("change", apply);
  textFilter.addEventListener("input", apply);
  apply();
})();
</script>
</body>
</html>
"""
)
