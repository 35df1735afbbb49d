// Warden console: refreshes the page's live part (#live) without a reload
// when jobs change (server-sent events from /events) and every 10 s
// besides. Nothing else: every page works without this script.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) return;
  var stateEl = document.getElementById("live-state");
  var timer = null;
  var pending = false;
  var busy = false;

  function say(text) {
    if (stateEl) stateEl.textContent = text;
  }

  // Someone typing in a form inside the live part keeps what they typed.
  function editing() {
    var a = document.activeElement;
    return a && live.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  }

  function refresh() {
    if (document.hidden || editing() || busy) {
      pending = true;
      return;
    }
    busy = true;
    fetch(location.href, {
      credentials: "same-origin",
      headers: { "X-Warden-Live": "1" },
    })
      .then(function (r) {
        return r.text();
      })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("live");
        if (fresh && fresh.innerHTML !== live.innerHTML) {
          live.innerHTML = fresh.innerHTML;
        }
        live.dataset.refreshed = String(Number(live.dataset.refreshed || "0") + 1);
        say("Last update " + new Date().toLocaleTimeString() + ".");
      })
      .catch(function () {
        say("Cannot reach Warden; trying again.");
      })
      .then(function () {
        busy = false;
        if (pending) {
          pending = false;
          schedule();
        }
      });
  }

  function schedule() {
    if (timer) return;
    timer = setTimeout(function () {
      timer = null;
      refresh();
    }, 200);
  }

  if (window.EventSource) {
    var events = new EventSource("/events");
    events.addEventListener("change", schedule);
    events.addEventListener("open", function () {
      say("Live.");
    });
    events.addEventListener("error", function () {
      say("Live updates interrupted; polling every 10 s.");
    });
  }
  setInterval(schedule, 10000);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && pending) {
      pending = false;
      schedule();
    }
  });
  live.addEventListener("focusout", function () {
    if (pending) {
      pending = false;
      schedule();
    }
  });
})();
