// actwh view: plain JavaScript, no library, no network beyond this server.
"use strict";

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  return Number(v).toPrecision(4).replace(/\.?0+(e|$)/, "$1");
}

function edgeTable(rows, dir) {
  const t = el("table", { class: "edges-" + dir });
  const head = el("tr");
  for (const h of [dir === "in" ? "from" : "to", "pos", "input", "value"]) head.appendChild(el("th", {}, h));
  t.appendChild(head);
  for (const r of rows) {
    const other = dir === "in"
      ? [r.up_label, r.up_layer, r.up_type, r.up_index, r.up_pos]
      : [r.down_label, r.down_layer, r.down_type, r.down_index, r.down_pos];
    const key = other.slice(1, 4).join("|") + "|" + (other[4] === null ? "" : other[4]);
    const tr = el("tr", { class: "edge-row", "data-other": key, "data-input": r.down_input || "",
                          "data-value": String(r.value) });
    tr.appendChild(el("td", {}, other[0]));
    tr.appendChild(el("td", {}, other[4] === null ? "Σ" : String(other[4])));
    tr.appendChild(el("td", {}, r.down_input || ""));
    tr.appendChild(el("td", {}, fmt(r.value)));
    t.appendChild(tr);
  }
  return t;
}

function histogram(values) {
  const ns = "http://www.w3.org/2000/svg";
  const W = 320, H = 110, nb = 16;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "hist");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H + 24);
  if (!values.length) return svg;
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi === lo) { lo -= 0.5; hi += 0.5; }
  const counts = new Array(nb).fill(0);
  for (const v of values) counts[Math.min(nb - 1, Math.floor((v - lo) / (hi - lo) * nb))] += 1;
  const top = Math.max(...counts);
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect");
    const h = top ? (c / top) * H : 0;
    r.setAttribute("class", "bar");
    r.setAttribute("x", i * (W / nb) + 1);
    r.setAttribute("y", H - h);
    r.setAttribute("width", W / nb - 2);
    r.setAttribute("height", h);
    r.setAttribute("data-count", c);
    const t = document.createElementNS(ns, "title");
    t.textContent = `${fmt(lo + (hi - lo) * i / nb)} .. ${fmt(lo + (hi - lo) * (i + 1) / nb)}: ${c} prompts`;
    r.appendChild(t);
    svg.appendChild(r);
  });
  for (const [x, v, a] of [[0, lo, "start"], [W, hi, "end"]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 14); t.setAttribute("text-anchor", a);
    t.textContent = fmt(v);
    svg.appendChild(t);
  }
  return svg;
}

function sqlBlock(queries) {
  const d = el("details", { class: "sql" });
  d.appendChild(el("summary", {}, `SQL that produced these numbers (${queries.length} queries)`));
  for (const q of queries) {
    const div = el("div", { class: "q" });
    div.appendChild(el("b", {}, q.name + " "));
    div.appendChild(el("code", {}, Object.entries(q.params).map(([k, v]) => `$${k} = ${JSON.stringify(v)}`).join(", ")));
    div.appendChild(el("pre", {}, q.sql));
    d.appendChild(div);
  }
  return d;
}

async function showNode(g, box) {
  const detail = document.getElementById("detail");
  document.querySelectorAll(".node.selected").forEach((n) => n.classList.remove("selected"));
  g.classList.add("selected");
  const q = new URLSearchParams({ run: box.dataset.run, prompt: box.dataset.prompt,
    layer: g.dataset.layer, node_type: g.dataset.type, node_index: g.dataset.index, k: "10" });
  if (g.dataset.pos !== "") q.set("pos", g.dataset.pos);
  detail.textContent = "loading…";
  detail.removeAttribute("data-ready");
  const res = await fetch("/api/node?" + q.toString());
  const data = await res.json();
  detail.textContent = "";
  if (!res.ok) {
    detail.appendChild(el("p", { class: "error" }, data.error));
    detail.setAttribute("data-ready", "error");
    return;
  }
  detail.setAttribute("data-key", g.dataset.key);
  detail.appendChild(el("h2", {}, data.label + " (" + data.node.node_type + ")"));
  detail.appendChild(el("h3", {}, `Top ${data.in.length} edges in`));
  detail.appendChild(edgeTable(data.in, "in"));
  detail.appendChild(el("h3", {}, `Top ${data.out.length} edges out`));
  detail.appendChild(edgeTable(data.out, "out"));
  const h = data.hist;
  detail.appendChild(el("h3", {}, "Across the run's prompts"));
  if (h.missing) {
    detail.appendChild(el("p", {}, h.missing));
  } else {
    const vals = h.values.map((r) => r.value);
    detail.appendChild(el("p", { class: "hist-caption", "data-n": vals.length },
      `${h.scalar}: stored in ${vals.length} of ${h.n_prompts} prompts`));
    detail.appendChild(histogram(vals));
  }
  detail.appendChild(sqlBlock(data.sql));
  detail.setAttribute("data-ready", "1");
}

document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("circuit");
  if (box) {
    box.addEventListener("click", (ev) => {
      const g = ev.target.closest(".node");
      if (g) showNode(g, box).catch((e) => { document.getElementById("detail").textContent = String(e); });
    });
  }
  // menus submit on change, so every choice lands in the URL
  document.querySelectorAll("form select").forEach((s) => s.addEventListener("change", () => s.form.submit()));
});
