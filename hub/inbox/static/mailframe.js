// The "show remote images" frame for one email (see hub/inbox/page.py).
//
// The inbox loads this page in <iframe sandbox="allow-scripts"> (opaque origin: no
// access to the inbox's storage or token) and posts it the email's sanitized HTML.
// This script never renders the HTML itself: it puts it in a nested sandboxed srcdoc
// frame without scripts, which inherits this page's CSP (remote images allowed).
"use strict";

let rendered = false;

addEventListener("message", (event) => {
  // Only our parent may hand us an email, and only once.
  if (rendered || event.source !== parent) return;
  const html = event.data && event.data.html;
  if (typeof html !== "string") return;
  rendered = true;
  const frame = document.createElement("iframe");
  frame.setAttribute("sandbox", "allow-popups");
  frame.setAttribute("title", "Email with remote images");
  // Links open in a new (still sandboxed) tab rather than inside this small frame.
  frame.srcdoc = '<!doctype html><meta charset="utf-8"><base target="_blank">' + html;
  for (const el of [document.documentElement, document.body]) {
    el.style.margin = "0";
    el.style.height = "100%";
  }
  frame.style.cssText = "border:0;width:100%;height:100%;display:block";
  document.body.append(frame);
});
