//! Reads `nft list table ip|ip6 kube-proxy` output back into a [`Table`], in the rule
//! syntax the renderer writes, so the [`super::tracer`] walks a live table as it walks a
//! render. nft lists a few expressions in another spelling than they were written in
//! (`meta mark & M == 0x00000000` for `mark and M == 0`, `a, b` in sets for `a , b`); those
//! are written back the renderer's way. Element timeouts and expiries (affinity sets) are
//! dropped: the key is what a lookup compares.

use super::render::SetKind;
use super::table::{Chain, SetObj, Table, element_key};

/// The table `text` lists (`None` when it lists no `table` block).
pub fn parse_listing(text: &str) -> Option<Table> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let header = lines.find_map(|l| l.strip_prefix("table "))?;
    let mut table = Table {
        header: Some(header.trim_end_matches('{').trim().to_string()),
        ..Table::default()
    };
    while let Some(line) = lines.next() {
        if let Some(name) = block_name(line, "chain ") {
            let chain = read_chain(&mut lines);
            table.chains.insert(name.to_string(), chain);
        } else if let Some(name) = block_name(line, "set ") {
            table
                .sets
                .insert(name.to_string(), read_set(&mut lines, SetKind::Set));
        } else if let Some(name) = block_name(line, "map ") {
            table
                .sets
                .insert(name.to_string(), read_set(&mut lines, SetKind::Map));
        }
    }
    Some(table)
}

/// `chain NAME {` → `NAME`.
fn block_name<'a>(line: &'a str, word: &str) -> Option<&'a str> {
    Some(line.strip_prefix(word)?.strip_suffix('{')?.trim())
}

fn read_chain<'a>(lines: &mut impl Iterator<Item = &'a str>) -> Chain {
    let mut chain = Chain::default();
    for line in lines.by_ref() {
        if line == "}" {
            break;
        }
        if line.starts_with("type ") {
            chain.spec = Some(line.to_string());
        } else if !line.starts_with("comment \"") && !line.starts_with("policy ") {
            chain.rules.push(rule_text(line));
        }
    }
    chain
}

fn read_set<'a>(lines: &mut impl Iterator<Item = &'a str>, kind: SetKind) -> SetObj {
    let mut spec = Vec::new();
    let mut elements = Vec::new();
    while let Some(line) = lines.next() {
        if line == "}" {
            break;
        }
        let Some(first) = line.strip_prefix("elements = {") else {
            spec.push(format!("{line} ;"));
            continue;
        };
        // The list may span lines; it ends at the line ending in `}`.
        let mut body = first.to_string();
        while !body.trim_end().ends_with('}') {
            let Some(more) = lines.next() else { break };
            body.push(' ');
            body.push_str(more);
        }
        let body = body.trim_end().trim_end_matches('}');
        elements.extend(split_elements(body).into_iter().map(|e| {
            let e = strip_expiry(&e);
            (element_key(&e).to_string(), e)
        }));
    }
    SetObj {
        kind,
        spec: spec.join(" "),
        elements,
    }
}

/// Splits `a, b comment "x, y" : goto c` at the commas outside quotes.
fn split_elements(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in body.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

/// `KEY timeout 10m expires 9m58s` → `KEY` (dynamic set elements).
fn strip_expiry(e: &str) -> String {
    let end = [e.find(" timeout "), e.find(" expires ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(e.len());
    e[..end].trim().to_string()
}

/// A listed rule in the renderer's spelling.
fn rule_text(line: &str) -> String {
    let spaced = space_commas(line);
    let w: Vec<&str> = spaced.split(' ').collect();
    match w.as_slice() {
        // `meta mark & M == 0x00000000 return` → `mark and M == 0 return`
        ["meta", "mark", "&", m, "==", zero, rest @ ..] if is_zero(zero) => {
            format!("mark and {m} == 0 {}", rest.join(" "))
        }
        // `meta mark set meta mark | M` / `^ M` → `mark set mark or M` / `xor M`
        [
            "meta",
            "mark",
            "set",
            "meta",
            "mark",
            op @ ("|" | "^"),
            m,
            rest @ ..,
        ] => {
            let op = if *op == "|" { "or" } else { "xor" };
            format!("mark set mark {op} {m} {}", rest.join(" "))
                .trim_end()
                .to_string()
        }
        _ => spaced,
    }
}

fn is_zero(s: &str) -> bool {
    s.trim_start_matches("0x").chars().all(|c| c == '0')
}

/// `{ a, b }` → `{ a , b }` (commas outside quoted strings).
fn space_commas(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                out.push(c);
            }
            ',' if !quoted => out.push_str(" ,"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"table ip kube-proxy {
	comment "rules for kube-proxy"
	set affinity-X {
		type ipv4_addr
		flags dynamic,timeout
		timeout 10m
		elements = { 203.0.113.1 timeout 10m expires 9m58s }
	}

	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.53 . tcp . 53 : goto service-A,
			     10.96.0.130 . tcp . 80 comment "demo/empty:http, x" : goto reject-chain }
	}

	chain masquerading {
		meta mark & 0x00004000 == 0x00000000 return
		meta mark set meta mark ^ 0x00004000
		masquerade fully-random
	}

	chain reject-chain {
		comment "helper for @no-endpoint-services / @no-endpoint-nodeports"
		reject
	}

	chain filter-input {
		type filter hook input priority filter; policy accept;
		ct state new jump nodeport-endpoints-check
	}

	chain service-A {
		numgen random mod 2 vmap { 0 : goto endpoint-a, 1 : goto endpoint-b }
	}
}
"#;

    #[test]
    fn a_listing_reads_back_in_the_renderers_spelling() {
        let t = parse_listing(LISTING).unwrap();
        assert_eq!(t.header.as_deref(), Some("ip kube-proxy"));
        assert_eq!(
            t.chains["masquerading"].rules,
            [
                "mark and 0x00004000 == 0 return",
                "mark set mark xor 0x00004000",
                "masquerade fully-random"
            ]
        );
        assert_eq!(t.chains["reject-chain"].rules, ["reject"]);
        assert_eq!(
            t.chains["filter-input"].spec.as_deref(),
            Some("type filter hook input priority filter; policy accept;")
        );
        assert_eq!(
            t.chains["service-A"].rules,
            ["numgen random mod 2 vmap { 0 : goto endpoint-a , 1 : goto endpoint-b }"]
        );
        let keys: Vec<&str> = t.sets["service-ips"]
            .elements
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["10.96.0.53 . tcp . 53", "10.96.0.130 . tcp . 80"]);
        assert_eq!(
            t.sets["service-ips"].elements[1].1,
            "10.96.0.130 . tcp . 80 comment \"demo/empty:http, x\" : goto reject-chain"
        );
        assert_eq!(t.sets["affinity-X"].elements[0].0, "203.0.113.1");
        assert!(t.sets["affinity-X"].spec.contains("timeout 10m"));
        assert_eq!(parse_listing(""), None);
    }
}
