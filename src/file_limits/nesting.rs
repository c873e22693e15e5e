//! A linear pre-scan that measures how deeply a YAML or JSON text nests,
//! so that a pathological file is refused before a parser sees it.
//!
//! It is not a parser: it follows just enough of YAML (flow brackets,
//! quoted scalars, plain scalars, comments, block scalars, indentation and
//! `- ` entries) to count nesting the way the parser will, and errs on the
//! side of counting too much. Its cost is one pass over the text.
//!
//! It also refuses YAML anchors (`&name`) and aliases (`*name`): an alias
//! repeats a whole subtree wherever it appears, so a small file of aliases
//! to aliases expands into gigabytes inside the parser (a "billion laughs"
//! file), and no rule file needs them. Only an `&` or `*` that starts a
//! node is one (after indentation, `- `, `: `, `? `, `[`, `{` or `,`); in a
//! plain scalar (`/api/**`, `a&b`), a quoted scalar or a comment it is text.

/// Where, and why, the scan refused the text (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub line: usize,
    pub column: usize,
    /// Whether the refusal is for an anchor or alias rather than depth.
    pub alias: bool,
}

impl TooDeep {
    /// What was refused, in words, for an error message ("nested deeper
    /// than 64 levels" or "YAML anchors and aliases are not allowed").
    pub fn reason(&self, limit: usize) -> String {
        if self.alias {
            "YAML anchors and aliases are not allowed".into()
        } else {
            format!("nested deeper than {limit} levels")
        }
    }
}

/// Checks that `text` nests at most `limit` levels and, for YAML, holds no
/// anchor or alias; `json` selects JSON (strings in `"` only, no comments,
/// no indentation structure, no anchors).
pub fn check_nesting(text: &str, json: bool, limit: usize) -> Result<(), TooDeep> {
    if json {
        scan_json(text, limit)
    } else {
        Yaml::new(limit).scan(text)
    }
}

fn scan_json(text: &str, limit: usize) -> Result<(), TooDeep> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        column += 1;
        if c == '\n' {
            line += 1;
            column = 0;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth > limit {
                    return Err(TooDeep {
                        line,
                        column,
                        alias: false,
                    });
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// One open flow collection.
struct Frame {
    /// For a `[`: whether its current entry is a single-pair mapping
    /// (`[a: b]`), one level more. `None` for a `{`.
    pair: Option<bool>,
    /// The deepest flow nesting reached inside the current entry: a key
    /// that is itself a collection (`[{a: b}: c]`) turns out to sit one
    /// level under the pair it opens.
    peak: usize,
}

/// The YAML scan's state, carried from line to line.
struct Yaml {
    limit: usize,
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// The open flow collections, innermost last.
    frames: Vec<Frame>,
    /// How many frames have a pair open.
    pairs: usize,
    /// The enclosing block collections (only while `flow == 0`): the
    /// column each starts at, and whether it is a mapping.
    indents: Vec<(usize, bool)>,
    /// Whether the current line has opened its mapping already.
    key_seen: bool,
    /// The deepest flow nesting since the current block line began: a
    /// flow collection can turn out to be a block key (`{a: b}: c`), one
    /// level under the mapping it opens.
    peak: usize,
    /// Block nesting in force when the current flow collection opened.
    block: usize,
    /// Inside a quoted scalar that continues on the next line.
    quote: Option<char>,
    /// Inside a flow plain scalar that may continue on the next line.
    plain: bool,
    /// Inside a block scalar (`|`, `>`) whose lines are indented more than this.
    block_scalar: Option<usize>,
}

impl Yaml {
    fn new(limit: usize) -> Self {
        Yaml {
            limit,
            flow: 0,
            frames: Vec::new(),
            pairs: 0,
            indents: Vec::new(),
            key_seen: false,
            peak: 0,
            block: 0,
            quote: None,
            plain: false,
            block_scalar: None,
        }
    }

    fn check(&self, depth: usize, line: usize, column: usize) -> Result<(), TooDeep> {
        if depth > self.limit {
            return Err(TooDeep {
                line,
                column,
                alias: false,
            });
        }
        Ok(())
    }

    fn scan(mut self, text: &str) -> Result<(), TooDeep> {
        for (n, raw) in text.split('\n').enumerate() {
            let line: Vec<char> = raw.strip_suffix('\r').unwrap_or(raw).chars().collect();
            self.line(&line, n + 1)?;
        }
        Ok(())
    }

    fn line(&mut self, chars: &[char], lineno: usize) -> Result<(), TooDeep> {
        let indent = chars.iter().take_while(|c| **c == ' ').count();
        let blank = chars[indent..].iter().all(|c| c.is_whitespace());
        if self.quote.is_none() {
            if let Some(parent) = self.block_scalar {
                if blank || indent > parent {
                    return Ok(());
                }
                self.block_scalar = None;
            }
        }
        let mut pos = 0;
        let mut content_col = indent;
        if self.quote.is_none() && self.flow == 0 {
            if blank || chars[indent] == '#' {
                return Ok(());
            }
            let is_entry = |p: usize| {
                matches!(chars.get(p), Some('-' | '?' | ':'))
                    && chars.get(p + 1).is_none_or(|c| *c == ' ' || *c == '\t')
            };
            // Collections that this line's indentation closes. A `- ` line at a
            // mapping's own indentation is that mapping's value (`a:` then `- x`).
            while let Some(&(col, map)) = self.indents.last() {
                if col > indent || (col == indent && !(map && is_entry(indent))) {
                    self.indents.pop();
                } else {
                    break;
                }
            }
            // `- - - x` nests one level per indicator on a single line; a
            // document start (`--- x`) is followed by a node.
            pos = indent;
            if indent == 0
                && chars.starts_with(&['-', '-', '-'])
                && chars.get(3).is_none_or(|c| *c == ' ' || *c == '\t')
            {
                pos = 3;
                while pos < chars.len() && (chars[pos] == ' ' || chars[pos] == '\t') {
                    pos += 1;
                }
            }
            while is_entry(pos) {
                // `? ` and `: ` (explicit key and value) belong to a mapping.
                self.indents.push((pos, chars[pos] != '-'));
                pos += 1;
                while pos < chars.len() && (chars[pos] == ' ' || chars[pos] == '\t') {
                    pos += 1;
                }
            }
            content_col = pos;
            self.key_seen = false;
            self.peak = 0;
            self.block = self.indents.len();
            self.check(self.block, lineno, pos.max(1))?;
            self.plain = false;
        }
        self.tokens(chars, pos, content_col, lineno)
    }

    /// A `key: value` (or `? key`) entry of a flow sequence is a mapping of
    /// its own: one level more (over its key too) until the entry ends.
    fn open_pair(&mut self, line: usize, column: usize) -> Result<(), TooDeep> {
        let mut depth = self.flow + self.pairs;
        if let Some(frame) = self.frames.last_mut() {
            if frame.pair == Some(false) {
                frame.pair = Some(true);
                self.pairs += 1;
                frame.peak += 1;
                depth = depth.max(frame.peak);
            }
        }
        self.peak = self.peak.max(depth);
        self.check(self.block + depth, line, column)
    }

    /// Ends the current entry of the innermost flow collection.
    fn end_entry(&mut self) {
        if let Some(frame) = self.frames.last_mut() {
            if frame.pair == Some(true) {
                frame.pair = Some(false);
                self.pairs -= 1;
            }
        }
        let depth = self.flow + self.pairs;
        if let Some(frame) = self.frames.last_mut() {
            frame.peak = depth;
        }
    }

    /// Scans the rest of a line from `pos`, a token start unless inside a
    /// quoted or flow plain scalar.
    fn tokens(
        &mut self,
        chars: &[char],
        mut pos: usize,
        content_col: usize,
        lineno: usize,
    ) -> Result<(), TooDeep> {
        let mut token_start = !self.plain;
        let mut after_space = true;
        let mut after_quote = false;
        let mut after_close = false;
        while pos < chars.len() {
            let c = chars[pos];
            let next = chars.get(pos + 1).copied();
            pos += 1;
            if let Some(q) = self.quote {
                match c {
                    '\'' if q == '\'' && next == Some('\'') => pos += 1,
                    '\\' if q == '"' => pos += 1,
                    _ if c == q => {
                        self.quote = None;
                        token_start = false;
                        after_quote = true;
                    }
                    _ => {}
                }
                continue;
            }
            if c == ' ' || c == '\t' {
                after_space = true;
                continue;
            }
            let space_or_end = next.is_none_or(|n| n == ' ' || n == '\t');
            let quoted_before = std::mem::take(&mut after_quote);
            let closed_before = std::mem::take(&mut after_close);
            match c {
                '#' if after_space => return Ok(()),
                '[' | '{' if token_start || self.flow > 0 => {
                    if self.flow == 0 {
                        self.plain = false;
                    }
                    self.flow += 1;
                    let depth = self.flow + self.pairs;
                    self.frames.push(Frame {
                        pair: (c == '[').then_some(false),
                        peak: depth,
                    });
                    self.plain = false;
                    token_start = true;
                    self.check(self.block + depth, lineno, pos)?;
                    self.peak = self.peak.max(depth);
                }
                ']' | '}' if self.flow > 0 => {
                    if let Some(frame) = self.frames.pop() {
                        if frame.pair == Some(true) {
                            self.pairs -= 1;
                        }
                        if let Some(parent) = self.frames.last_mut() {
                            parent.peak = parent.peak.max(frame.peak);
                        }
                    }
                    self.flow -= 1;
                    self.plain = false;
                    token_start = false;
                    after_close = true;
                }
                ',' if self.flow > 0 => {
                    self.end_entry();
                    self.plain = false;
                    token_start = true;
                }
                '?' if token_start && (space_or_end || self.flow > 0) => {
                    self.open_pair(lineno, pos)?
                }
                ':' if space_or_end
                    || (self.flow > 0
                        && (token_start
                            || quoted_before
                            || closed_before
                            || next.is_some_and(|n| "[]{},".contains(n)))) =>
                {
                    self.plain = false;
                    token_start = true;
                    self.open_pair(lineno, pos)?;
                    if self.flow == 0 && !self.key_seen {
                        // A block key: this line's content opens a mapping.
                        self.key_seen = true;
                        if self.indents.last().map(|e| e.0) != Some(content_col) {
                            self.indents.push((content_col, true));
                        } else if let Some(last) = self.indents.last_mut() {
                            last.1 = true;
                        }
                        self.block = self.indents.len();
                        self.check(self.block + self.peak, lineno, pos)?;
                    }
                }
                '\'' | '"' if token_start => self.quote = Some(c),
                '|' | '>' if token_start && self.flow == 0 => {
                    self.block_scalar = Some(content_col);
                    return Ok(());
                }
                '-' if token_start && space_or_end => {}
                '&' | '*' if token_start => {
                    return Err(TooDeep {
                        line: lineno,
                        column: pos,
                        alias: true,
                    });
                }
                '!' if token_start => {
                    // A tag: the node follows after a space.
                    while pos < chars.len() && chars[pos] != ' ' {
                        pos += 1;
                    }
                }
                _ => {
                    if token_start {
                        token_start = false;
                        self.plain = self.flow > 0;
                    }
                }
            }
            after_space = false;
        }
        Ok(())
    }
}
