// Progressive enhancement of the pages; without it everything still shows and submits.
// Served as a file of the package (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";

  // A running run's progress bar follows the run without a reload.
  function follow(box) {
    var url = box.getAttribute("data-progress-url");
    var bar = box.querySelector("progress");
    var text = box.querySelector(".progress-text");
    function tick() {
      fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) { throw new Error(String(response.status)); }
          return response.json();
        })
        .then(function (run) {
          bar.value = run.fraction;
          bar.textContent = run.percent + "%";
          text.textContent = run.percent + "% · " + run.text;
          if (run.active) { window.setTimeout(tick, 500); } else { window.location.reload(); }
        })
        .catch(function () { window.setTimeout(tick, 2000); });
    }
    window.setTimeout(tick, 500);
  }
  document.querySelectorAll("[data-progress-url]").forEach(follow);

  // The upload form sends its files with a progress bar, then shows the run.
  var form = document.getElementById("upload-form");
  if (form && window.FormData) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var box = form.querySelector(".upload-progress");
      var bar = box.querySelector("progress");
      var text = box.querySelector(".upload-text");
      var button = form.querySelector("button[type=submit]");
      var request = new XMLHttpRequest();
      box.hidden = false;
      button.disabled = true;
      request.open("POST", form.action);
      request.upload.addEventListener("progress", function (e) {
        if (!e.lengthComputable) { return; }
        bar.value = e.loaded / e.total;
        bar.textContent = Math.round(100 * e.loaded / e.total) + "%";
        text.textContent = Math.round(100 * e.loaded / e.total) + "% uploaded (" +
          e.loaded + " of " + e.total + " bytes)";
      });
      request.addEventListener("load", function () {
        if (request.status < 400) { window.location.assign(request.responseURL); return; }
        var page = new DOMParser().parseFromString(request.responseText, "text/html");
        var problem = page.querySelector(".problem");
        text.textContent = problem ? problem.textContent : "Refused (" + request.status + ").";
        button.disabled = false;
      });
      request.addEventListener("error", function () {
        text.textContent = "The upload failed: the server could not be reached.";
        button.disabled = false;
      });
      request.send(new FormData(form));
    });
  }
})();
