"""bench/gpu.py's report: the Markdown table (entry | sdlens | baseline | ratio | aim | met?) built from the
entries' figures, and atomic file writes."""
import os

AIMS = dict(generate_vs_eager=1.8, p2p_ratio=1.15, pnp_s=2.5, null_text_s=15.0)  # sdlens issue #16


def fmt_s(v):
    return "-" if v is None else f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def cell(run, extra=""):
    if run is None:
        return "-"
    mem = f", +{run['peak_over_base_bytes'] / 2 ** 30:.2f} GiB" if run.get("peak_bytes") else ""
    return f"{fmt_s(run['median_s'])}{extra}{mem}"


def table(R, aims_apply):
    """Markdown rows: entry | sdlens | baseline | ratio | aim | met?"""
    rows = []

    def add(entry, ours, base, ratio="", aim="", met=None):
        m = "" if met is None else ("yes" if met else "no") if aims_apply else f"n/a ({'yes' if met else 'no'} here)"
        rows.append(f"| {entry} | {ours} | {base} | {ratio} | {aim} | {m} |")

    def get(name):
        v = R.get(name, {})
        if "error" in v or "skipped" in v:
            add(name, v.get("error") or v.get("skipped"), "", "", "", None)
            return None
        return v

    if (v := get("correctness")):
        add("correctness vs diffusers", f"{v['passed']}/{v['total']} pass", "", "", "all pass", v["passed"] == v["total"])
    if (v := get("host_syncs")):
        ok = {k: v[k]["result"] for k in ("p2p", "pnp")}
        add("no host sync in a P2P / PnP step", f"P2P {ok['p2p']}, PnP {ok['pnp']}", "", "", "pass",
            None if "n/a" in ok["p2p"] else all(r == "pass" for r in ok.values()))
    for name, what, unit in (("unet_forward", "UNet forward b2", None), ("generate", "generate", "it_per_s")):
        if (v := get(name)):
            r = v["runs"]
            for mode in ("eager", "compiled"):
                o, b = r.get(f"sdlens_{mode}"), r.get(f"diffusers_{mode}")
                if o is None:
                    continue
                extra = lambda x: f" ({x[unit]:.1f} it/s)" if unit else ""
                note = f"; first call {fmt_s(o['first_s'])} / {fmt_s(b['first_s'])}" if mode == "compiled" else ""
                sp = b["median_s"] / o["median_s"]
                aim = met = None
                if name == "generate" and mode == "compiled":
                    aim, met = "ahead of diffusers compiled", sp > 1
                add(f"{what} {mode}{note}", cell(o, extra(o)), cell(b, extra(b)), f"{sp:.2f}x faster", aim or "", met)
            if name == "generate":
                best = min((r[k] for k in ("sdlens_eager", "sdlens_compiled") if k in r), key=lambda x: x["median_s"])
                sp = r["diffusers_eager"]["median_s"] / best["median_s"]
                add("generate: sdlens best vs diffusers eager", cell(best), cell(r["diffusers_eager"]), f"{sp:.2f}x faster",
                    f">= {AIMS['generate_vs_eager']}x", sp >= AIMS["generate_vs_eager"])
    if (v := get("attention_hooks")):
        r = v["runs"]
        add(f"UNet b2, {v['hooked_points']} cross-attn hook_probs hooked (explicit softmax) vs SDPA", cell(r["probs_hooked"]),
            cell(r["sdpa"]), f"{r['probs_hooked']['median_s'] / r['sdpa']['median_s']:.2f}x",
            f"a fused kernel saves <= {fmt_s(max(v['fused_kernel_upper_bound_s'], 0))} per call")
    if (v := get("channels_last")):
        r = v["runs"]
        add("UNet b2 channels_last vs contiguous (eager)", cell(r["channels_last"]), cell(r["contiguous"]),
            f"{r['channels_last']['median_s'] / r['contiguous']['median_s']:.2f}x")
    if (v := get("p2p")):
        for mode, m in ((k, v[k]) for k in ("eager", "compiled") if k in v):
            add(f"P2P (source + target) {mode}", cell(m["runs"]["p2p"]), cell(m["runs"]["generate2"]) + " (generate 2)",
                f"{m['ratio']:.2f}x", f"<= {AIMS['p2p_ratio']}x", m["ratio"] <= AIMS["p2p_ratio"])
    for name, label, aim in (("pnp", "PnP incl. inversion", "pnp_s"), ("null_text", "null-text inversion", "null_text_s")):
        if (v := get(name)):
            s = v["runs"][name]["median_s"]
            add(f"{label} ({v.get('steps', v.get('inversion_steps'))} steps, eager)", cell(v["runs"][name]), "", "",
                f"<= {AIMS[aim]} s", s <= AIMS[aim])
    if (v := get("dift")):
        r = v["runs"]
        o, b = r["sdlens_extract"], r["diffusers_dift"]
        add(f"DIFT {v['size']}^2, ensemble {v['ensemble']}, {v['images']} images", cell(o, f" ({o['images_per_s']:.2f} img/s)"),
            cell(b, f" ({b['images_per_s']:.2f} img/s)"), f"{b['median_s'] / o['median_s']:.2f}x faster")
    if (v := get("sdxl")):
        g, n = v["generate"], f"SDXL {v['size']}^2 {v['steps']} steps"
        for mode in ("eager", "compiled"):
            if f"sdlens_{mode}" in g:
                o, b = g[f"sdlens_{mode}"], g[f"diffusers_{mode}"]
                add(f"{n} generate {mode}", cell(o), cell(b), f"{b['median_s'] / o['median_s']:.2f}x faster")
        t = v["turbo_1step"]
        add("SDXL-Turbo 1 step (guidance 0)", cell(t["sdlens"]), cell(t["diffusers"]),
            f"{t['diffusers']['median_s'] / t['sdlens']['median_s']:.2f}x faster")
        m = v["p2p"]
        add(f"{n} P2P (source + target)", cell(m["runs"]["p2p"]), cell(m["runs"]["generate2"]) + " (generate 2)",
            f"{m['ratio']:.2f}x", f"<= {AIMS['p2p_ratio']}x", m["ratio"] <= AIMS["p2p_ratio"])
    if (v := get("profile")):
        add(f"profile ({v['mode']}, {v['sorted_by']}): top ops", v["summary"], "", "", "")
    head = "| entry | sdlens | baseline | ratio | aim | met? |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


def write_atomic(path, text):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a failed write leaves nothing behind
            os.remove(tmp)
