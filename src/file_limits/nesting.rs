//! A linear pre-scan that measures how deeply a YAML or JSON text nests,
//! so that a pathological file is refused before a parser sees it.
//!
//! It is not a parser: it follows just enough of YAML (flow brackets,
//! quoted scalars, plain scalars, comments, block scalars, indentation and
//! `- ` entries) to count nesting the way the parser will, and errs on the
//! side of counting too much. Its cost is one pass over the text.

/// Where the text first nests deeper than the limit (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub line: usize,
    pub column: usize,
}

/// Checks that `text` nests at most `limit` levels; `json` selects JSON
/// (strings in `"` only, no comments, no indentation structure).
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
                    return Err(TooDeep { line, column });
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The YAML scan's state, carried from line to line.
struct Yaml {
    limit: usize,
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// Indentations of the enclosing block lines (only while `flow == 0`).
    indents: Vec<usize>,
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
            indents: Vec::new(),
            block: 0,
            quote: None,
            plain: false,
            block_scalar: None,
        }
    }

    fn check(&self, depth: usize, line: usize, column: usize) -> Result<(), TooDeep> {
        if depth > self.limit {
            return Err(TooDeep { line, column });
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
            while self.indents.last().is_some_and(|i| *i >= indent) {
                self.indents.pop();
            }
            self.indents.push(indent);
            // `- - - x` nests one level per indicator on a single line.
            let mut entries = 0;
            pos = indent;
            while pos < chars.len()
                && matches!(chars[pos], '-' | '?' | ':')
                && chars.get(pos + 1).map_or(true, |c| *c == ' ' || *c == '\t')
            {
                entries += 1;
                pos += 1;
                while pos < chars.len() && (chars[pos] == ' ' || chars[pos] == '\t') {
                    pos += 1;
                }
            }
            content_col = pos;
            self.block = self.indents.len() + entries;
            self.check(self.block, lineno, pos.max(1))?;
            self.plain = false;
        }
        self.tokens(chars, pos, content_col, lineno)
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
                    }
                    _ => {}
                }
                continue;
            }
            let space_or_end = next.map_or(true, |n| n == ' ' || n == '\t');
            match c {
                ' ' | '\t' => {
                    after_space = true;
                    continue;
                }
                '#' if after_space => return Ok(()),
                '[' | '{' if token_start || self.flow > 0 => {
                    if self.flow == 0 {
                        self.plain = false;
                    }
                    self.flow += 1;
                    self.plain = false;
                    token_start = true;
                    self.check(self.block + self.flow, lineno, pos)?;
                }
                ']' | '}' if self.flow > 0 => {
                    self.flow -= 1;
                    self.plain = false;
                    token_start = false;
                }
                ',' if self.flow > 0 => {
                    self.plain = false;
                    token_start = true;
                }
                ':' if space_or_end
                    || (self.flow > 0 && next.is_some_and(|n| "[]{},".contains(n))) =>
                {
                    self.plain = false;
                    token_start = true;
                }
                '\'' | '"' if token_start => self.quote = Some(c),
                '|' | '>' if token_start && self.flow == 0 => {
                    self.block_scalar = Some(content_col);
                    return Ok(());
                }
                '-' | '?' if token_start && space_or_end => {}
                '&' | '!' if token_start => {
                    // An anchor or a tag: the node follows after a space.
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
