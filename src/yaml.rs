//! The one way untrusted YAML is parsed: a linear pre-scan refuses documents nested deeper
//! than [`MAX_DEPTH`] before the parser sees them. libyaml-based parsers take time quadratic in
//! the nesting depth (50 000 levels in 100 KB kept the controller busy for seconds), and no
//! desired state, PodSpec, ConfigMap or kubeconfig needs more than a dozen levels.

use serde::de::DeserializeOwned;

/// Deepest nesting accepted (block and flow collections together).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("nested deeper than {limit} levels (line {line})")]
    TooDeep { limit: usize, line: usize },
    #[error("{0}")]
    Parse(String),
}

/// Parses `text` after checking its depth.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    check_depth(text, MAX_DEPTH)?;
    serde_yaml_ng::from_str(text).map_err(|e| YamlError::Parse(e.to_string()))
}

/// Every document of a multi-document stream (`---` separated), each depth-checked.
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    check_depth(text, MAX_DEPTH)?;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| T::deserialize(d).map_err(|e| YamlError::Parse(e.to_string())))
        .collect()
}

/// Estimates the nesting depth of a YAML text in one pass and refuses more than `limit`.
///
/// The estimate never undercounts: every open flow bracket, every block indentation level and
/// every `- ` / `? ` entry marker on a line counts as a level. It can overcount (an indented
/// comment-free plain scalar continuation counts as a level), which only matters for documents
/// near the limit, far beyond what real configuration uses. Block scalars (`|`, `>`) are text,
/// not structure: their lines are skipped.
///
/// One function on purpose: it is one pass whose state (the indentation stack, the flow
/// depth, an open quote, an open block scalar) crosses lines; split, that state would travel
/// through every piece.
pub fn check_depth(text: &str, limit: usize) -> Result<(), YamlError> {
    let too_deep = |line: usize| YamlError::TooDeep { limit, line };
    // Indentation columns of the enclosing block collections.
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // Inside a block scalar: lines indented more than this column are its text.
    let mut scalar_parent: Option<usize> = None;
    // Inside a quoted scalar spanning lines.
    let mut quote: Option<u8> = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        let blank = bytes[indent..]
            .iter()
            .all(|b| *b == b' ' || *b == b'\t' || *b == b'\r');
        if let Some(parent) = scalar_parent {
            if blank || indent > parent {
                continue;
            }
            scalar_parent = None;
        }
        if blank {
            continue;
        }
        if quote.is_none() && flow == 0 {
            if bytes[indent] == b'#' {
                continue;
            }
            if line.starts_with("---") || line.starts_with("...") {
                indents.clear();
                continue;
            }
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut depth_here = indents.len();
        let mut i = indent;
        // Entry markers at the start of the content nest one level each ("- - - x").
        if quote.is_none() && flow == 0 {
            while i + 1 < bytes.len()
                && (bytes[i] == b'-' || bytes[i] == b'?' || bytes[i] == b':')
                && (bytes[i + 1] == b' ' || bytes[i + 1] == b'\t')
            {
                depth_here += 1;
                i += 2;
                while i < bytes.len() && bytes[i] == b' ' {
                    i += 1;
                }
            }
        }
        if depth_here + flow > limit {
            return Err(too_deep(n));
        }
        let i = scan_line(bytes, i, depth_here, &mut flow, &mut quote, limit)
            .map_err(|()| too_deep(n))?;
        // `key: |`, `- >-`, `key: |2`: the following more-indented lines are text.
        if quote.is_none() && flow == 0 {
            let t = line[..i.min(line.len())].trim_end();
            let t = t.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '+');
            if t.ends_with('|') || t.ends_with('>') {
                let before = t[..t.len() - 1].trim_end();
                if before.is_empty() || before.ends_with(':') || before.ends_with('-') {
                    scalar_parent = Some(indent);
                }
            }
        }
    }
    Ok(())
}

/// Scans one line's content from byte `i` for quotes, flow brackets and a comment, carrying
/// the open quote and flow depth across lines. Returns where the content ends (a comment or
/// the line's end); `Err` when a bracket nests deeper than `limit`.
fn scan_line(
    bytes: &[u8],
    mut i: usize,
    depth_here: usize,
    flow: &mut usize,
    quote: &mut Option<u8>,
    limit: usize,
) -> Result<usize, ()> {
    // A quote opens a quoted scalar only where a node starts (line start, after an entry
    // marker, `: `, or a flow `[`, `{`, `,`); elsewhere it is part of a plain scalar. A
    // comment is recognised only outside flow collections: inside them every bracket
    // counts, so a misread never hides nesting (it can only overcount).
    let mut expect_node = quote.is_none();
    let mut prev = b' ';
    while i < bytes.len() {
        let b = bytes[i];
        match *quote {
            Some(q) => {
                if b == b'\\' && q == b'"' {
                    i += 1;
                } else if b == q {
                    if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                        i += 1;
                    } else {
                        *quote = None;
                    }
                }
            }
            None => match b {
                b' ' | b'\t' | b'\r' => {
                    if prev == b':' {
                        expect_node = true;
                    }
                }
                b'#' if *flow == 0 && (prev == b' ' || prev == b'\t') => break,
                b'"' | b'\'' if expect_node => *quote = Some(b),
                b'[' | b'{' => {
                    *flow += 1;
                    if depth_here + *flow > limit {
                        return Err(());
                    }
                    expect_node = true;
                }
                b',' if *flow > 0 => expect_node = true,
                b']' | b'}' => {
                    *flow = flow.saturating_sub(1);
                    expect_node = false;
                }
                _ => expect_node = false,
            },
        }
        prev = b;
        i += 1;
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_documents_pass() {
        let pod = "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: a\n    image: x\n    env:\n    - {name: A, value: \"[{\"}\n    command: [\"/bin/sh\", \"-c\", 'echo {[('] # a comment with [[[\n    resources:\n      limits: {memory: 64Mi}\n";
        check_depth(pod, 8).unwrap();
        let block = "workloads:\n  - name: w\n    specification: |\n      command: [\"/x\"]\n                   deeply:\n                                 indented text\n    kind: shell\n";
        check_depth(block, 4).unwrap();
        check_depth("", 1).unwrap();
        check_depth("{\"a\": [1, {\"b\": 2}]}", 4).unwrap();
    }

    #[test]
    fn deep_flow_and_block_nesting_are_refused() {
        let flow = "[".repeat(50_000);
        assert!(matches!(
            check_depth(&flow, MAX_DEPTH),
            Err(YamlError::TooDeep { line: 1, .. })
        ));
        let mut block = String::new();
        for i in 0..100 {
            block.push_str(&" ".repeat(i));
            block.push_str("a:\n");
        }
        assert!(check_depth(&block, MAX_DEPTH).is_err());
        let dashes = "- ".repeat(100) + "x\n";
        assert!(check_depth(&dashes, MAX_DEPTH).is_err());
        let json = "{\"a\":".repeat(100) + "1" + &"}".repeat(100);
        assert!(check_depth(&json, MAX_DEPTH).is_err());
    }

    #[test]
    fn from_str_reports_depth_before_parsing() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        let r: Result<serde_yaml_ng::Value, _> = from_str(&deep);
        assert!(matches!(r, Err(YamlError::TooDeep { .. })), "{r:?}");
        let v: serde_yaml_ng::Value = from_str("a: [1, 2]").unwrap();
        assert_eq!(v["a"][1], serde_yaml_ng::Value::from(2));
    }

    #[test]
    fn large_inputs_are_scanned_in_one_pass() {
        let wide = "k: v\n".repeat(800_000);
        check_depth(&wide, MAX_DEPTH).unwrap();
        let deep = "[".repeat(4 << 20);
        assert!(check_depth(&deep, MAX_DEPTH).is_err());
    }

    #[test]
    fn quotes_and_comments_cannot_hide_nesting() {
        let deep = "[".repeat(100);
        // A '#' inside a JSON-like string is no comment for the scanner in flow context.
        let a = format!("{{\"a\":\"x #\", \"b\": {deep}}}");
        assert!(check_depth(&a, MAX_DEPTH).is_err());
        // A quote in the middle of a plain scalar opens nothing.
        let b = format!("k: a \"b\nv: {deep}");
        assert!(check_depth(&b, MAX_DEPTH).is_err());
        let c = format!("k:\"x\nv: {deep}");
        assert!(check_depth(&c, MAX_DEPTH).is_err());
        // Real quoted strings with brackets and comments are text.
        check_depth(&format!("k: \"{deep}\" # {deep}\nl: '{deep}'\n"), MAX_DEPTH).unwrap();
    }
}
