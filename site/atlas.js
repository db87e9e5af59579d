// atlas: filter, search and keyboard navigation. Classic script: works from file:// too.
(function () {
  "use strict";

  function normalize(text) { return text.toLowerCase().trim(); }

  function words(text) { return normalize(text).split(/\s+/).filter(Boolean); }

  // Does one of `labels` hold every word? ("white shark" finds "great white shark")
  function labelMatches(labels, query) {
    return labels.filter(function (label) {
      var text = normalize(label);
      return query.every(function (word) { return text.indexOf(word) >= 0; });
    });
  }

  // Layer pages: filter the grid by channel number or label, and by the classes a unit pushes
  // up; sort it by index, change, trust or activation ratio (data-* of each cell); ?q=,
  // ?pushes= and ?sort= deep links (none for the page's own order, the sort box's data-default).
  var filter = document.getElementById("filter");
  var grid = document.getElementById("grid");
  if (filter && grid) {
    var cells = Array.prototype.slice.call(grid.querySelectorAll(".cell"));
    var matches = document.getElementById("matches");
    var pushes = document.getElementById("pushes");
    var sort = document.getElementById("sort");
    var controls = {q: filter, pushes: pushes, sort: sort};
    var byDefault = sort ? sort.getAttribute("data-default") || "index" : "index";
    var apply = function () {
      var query = words(filter.value);
      var classes = pushes ? words(pushes.value) : [];
      var shown = 0;
      cells.forEach(function (cell) {
        var haystack = normalize(cell.getAttribute("data-q"));
        var index = cell.getAttribute("data-index");
        var hit = query.every(function (word) {
          // a number is a channel or class index, never a digit of the layer's name
          return /^\d+$/.test(word) ? index === word : haystack.indexOf(word) >= 0;
        });
        if (hit && classes.length) {
          var pushed = (cell.getAttribute("data-pushes") || "").split("|").filter(Boolean);
          hit = labelMatches(pushed, classes).length > 0;
        }
        cell.hidden = !hit;
        if (hit) { shown += 1; }
      });
      if (matches) {
        var asked = query.length || classes.length;
        matches.textContent = asked ? shown + " of " + cells.length + " units match" : "";
      }
    };
    var order = function () {
      var how = sort.value;
      var key = how.split("-")[0];  // index, change, trust or ratio
      var sign = /-high$/.test(how) ? -1 : 1;
      var value = function (cell) {
        var text = cell.getAttribute(key === "index" ? "data-index" : "data-" + key);
        return text === null || text === "" ? null : parseFloat(text);
      };
      var byIndex = function (a, b) {
        return parseInt(a.getAttribute("data-index"), 10) - parseInt(b.getAttribute("data-index"), 10);
      };
      cells.slice().sort(function (a, b) {
        var x = value(a), y = value(b);
        if (x === null || y === null) {  // units without the value go last, by index
          return x === y ? byIndex(a, b) : (x === null ? 1 : -1);
        }
        return sign * (x - y) || byIndex(a, b);
      }).forEach(function (cell) { grid.appendChild(cell); });
    };
    var remember = function () {
      try {
        var url = new URL(window.location.href);
        Object.keys(controls).forEach(function (name) {
          var box = controls[name];
          if (box && box.value && !(name === "sort" && box.value === byDefault)) {
            url.searchParams.set(name, box.value);
          } else {
            url.searchParams.delete(name);
          }
        });
        window.history.replaceState(null, "", url.toString());
      } catch (error) { /* some file:// settings refuse replaceState: the filter still works */ }
    };
    var params = new URLSearchParams(window.location.search);
    Object.keys(controls).forEach(function (name) {
      var box = controls[name];
      var given = params.get(name);
      if (!box || !given) { return; }
      var known = name !== "sort" || Array.prototype.some.call(box.options, function (option) {
        return option.value === given;
      });
      if (known) { box.value = given; }
    });
    if (sort) { order(); }  // without one the grid keeps its order (compare: most changed first)
    apply();
    filter.addEventListener("input", function () { apply(); remember(); });
    if (pushes) { pushes.addEventListener("input", function () { apply(); remember(); }); }
    if (sort) { sort.addEventListener("change", function () { order(); remember(); }); }
  }

  // Index page: search every unit by id or label, and by the classes it pushes up (the index
  // is search-index.js: [id, label, href, class indices]; ATLAS_LABELS names the classes).
  var search = document.getElementById("search");
  var results = document.getElementById("results");
  if (search && results && window.ATLAS_SEARCH) {
    var labels = window.ATLAS_LABELS || {};
    var pushed = function (entry) {
      return (entry[3] || []).map(function (k) { return labels[k] || "class " + k; });
    };
    var found = document.getElementById("found");
    search.addEventListener("input", function () {
      var query = words(search.value);
      results.textContent = "";
      if (found) { found.textContent = ""; }
      if (!query.length) { return; }
      var byName = [], byClass = [];
      window.ATLAS_SEARCH.forEach(function (entry) {
        var haystack = normalize(entry[0] + " " + entry[1]);
        if (query.every(function (word) { return haystack.indexOf(word) >= 0; })) {
          byName.push([entry, null]);
          return;
        }
        var classes = labelMatches(pushed(entry), query);
        if (classes.length) { byClass.push([entry, classes]); }
      });
      byName.concat(byClass).slice(0, 50).forEach(function (found) {
        var entry = found[0];
        var item = document.createElement("li");
        var link = document.createElement("a");
        link.href = entry[2];
        link.textContent = entry[1] ? entry[0] + " (" + entry[1] + ")" : entry[0];
        item.appendChild(link);
        if (found[1]) {
          var why = document.createElement("span");
          why.className = "why";
          why.textContent = " pushes " + found[1].join(", ");
          item.appendChild(why);
        }
        results.appendChild(item);
      });
      if (found) {  // announced to screen readers (role="status")
        var total = byName.length + byClass.length;
        found.textContent = (total === 1 ? "1 unit" : total + " units") + " found" +
          (total > 50 ? ", the first 50 shown" : "");
      }
    });
  }

  // Unit pages: the timelapse plays unless the reader asked for reduced motion; its button
  // pauses it (the unit's picture, the still, replaces the animation) and plays it again.
  var reduced = window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  Array.prototype.forEach.call(document.querySelectorAll("figure.timelapse"), function (figure) {
    var image = figure.querySelector("img[data-animation]");
    var source = figure.querySelector("source");
    var button = figure.querySelector("button.motion");
    if (!image || !button) { return; }
    var show = function (playing) {
      var src = image.getAttribute(playing ? "data-animation" : "data-still");
      if (source) { source.setAttribute("srcset", src); }
      image.setAttribute("src", src);
      button.textContent = playing ? "Pause" : "Play";
      button.setAttribute("aria-label", (playing ? "Pause" : "Play") + " the animation");
      figure.setAttribute("data-playing", playing ? "true" : "false");
    };
    button.hidden = false;
    show(!reduced);
    button.addEventListener("click", function () {
      show(figure.getAttribute("data-playing") !== "true");
    });
  });

  // Unit pages: a click on a filmstrip frame shows that checkpoint's picture large, with its
  // caption; without the script the frame is a link to its picture.
  var strip = document.getElementById("filmstrip");
  var large = document.querySelector("figure.main img.large");
  var shown = document.getElementById("shown");
  if (strip && large && shown) {
    strip.addEventListener("click", function (event) {
      var frame = event.target.closest("a[data-caption]");
      if (!frame) { return; }
      event.preventDefault();
      var picture = frame.querySelector("img");
      ["src", "width", "height", "alt"].forEach(function (name) {
        large.setAttribute(name, picture.getAttribute(name));
      });
      shown.textContent = frame.getAttribute("data-caption");
      strip.querySelectorAll("a[aria-current]").forEach(function (other) {
        other.removeAttribute("aria-current");
      });
      frame.setAttribute("aria-current", "true");
    });
  }

  // Activation atlas pages: the zoom slider sets the size of the grid's cells (without the
  // script the grid keeps its size and scrolls). A click on a cell opens its panel (CSS :target).
  var zoom = document.getElementById("zoom");
  var plane = document.getElementById("activation-atlas");
  if (zoom && plane) {
    var zoomBox = document.getElementById("zoom-box");
    var resize = function () { plane.style.setProperty("--cell", zoom.value + "px"); };
    if (zoomBox) { zoomBox.hidden = false; }
    zoom.addEventListener("input", resize);
    resize();
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
