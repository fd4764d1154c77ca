"use strict";
// A reload drops the token from the address (the page moved it to sessionStorage):
// come back with it once. A refused stored token is forgotten.
(function () {
  const token = sessionStorage.getItem("artcafe-token");
  if (!token) return;
  const params = new URLSearchParams(location.search);
  if (params.get("token") === token) { sessionStorage.removeItem("artcafe-token"); return; }
  location.replace("/?token=" + encodeURIComponent(token));
})();
