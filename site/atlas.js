// atlas: filter, search and keyboard navigation. Classic script: works from file:// too.
(function () {
  "use strict";

  function normalize(text) { return text.toLowerCase().trim(); }

  // Layer pages: filter the grid by channel number or label; ?q= deep links.
  var filter = document.getElementById("filter");
  var grid = document.getElementById("grid");
  if (filter && grid) {
    var cells = Array.prototype.slice.call(grid.querySelectorAll(".cell"));
    var matches = document.getElementById("matches");
    var apply = function () {
      var words = normalize(filter.value).split(/\s+/).filter(Boolean);
      var shown = 0;
      cells.forEach(function (cell) {
        var haystack = normalize(cell.getAttribute("data-q"));
        var index = cell.getAttribute("data-index");
        var hit = words.every(function (word) {
          // a number is a channel or class index, never a digit of the layer's name
          return /^\d+$/.test(word) ? index === word : haystack.indexOf(word) >= 0;
        });
        cell.hidden = !hit;
        if (hit) { shown += 1; }
      });
      if (matches) {
        matches.textContent = words.length ? shown + " of " + cells.length + " units match" : "";
      }
    };
    var query = new URLSearchParams(window.location.search).get("q");
    if (query) { filter.value = query; }
    apply();
    filter.addEventListener("input", function () {
      apply();
      try {
        var url = new URL(window.location.href);
        if (filter.value) { url.searchParams.set("q", filter.value); }
        else { url.searchParams.delete("q"); }
        window.history.replaceState(null, "", url.toString());
      } catch (error) { /* some file:// settings refuse replaceState: the filter still works */ }
    });
  }

  // Index page: search every unit by id or label (the index is search-index.js).
  var search = document.getElementById("search");
  var results = document.getElementById("results");
  if (search && results && window.ATLAS_SEARCH) {
    search.addEventListener("input", function () {
      var words = normalize(search.value).split(/\s+/).filter(Boolean);
      results.textContent = "";
      if (!words.length) { return; }
      var found = window.ATLAS_SEARCH.filter(function (entry) {
        var haystack = normalize(entry[0] + " " + entry[1]);
        return words.every(function (word) { return haystack.indexOf(word) >= 0; });
      }).slice(0, 50);
      found.forEach(function (entry) {
        var item = document.createElement("li");
        var link = document.createElement("a");
        link.href = entry[2];
        link.textContent = entry[1] ? entry[0] + " (" + entry[1] + ")" : entry[0];
        item.appendChild(link);
        results.appendChild(item);
      });
    });
  }

  // Keyboard: "/" focuses the filter or search box; arrows go to the previous/next unit.
  document.addEventListener("keydown", function (event) {
    var typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
    if (event.key === "/" && !typing) {
      var box = filter || search;
      if (box) { event.preventDefault(); box.focus(); }
      return;
    }
    if (typing || document.activeElement.isContentEditable) { return; }
    if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) { return; }
    var target = event.key === "ArrowLeft" ? document.body.getAttribute("data-previous")
               : event.key === "ArrowRight" ? document.body.getAttribute("data-next") : null;
    if (target) { window.location.href = target; }
  });
})();
