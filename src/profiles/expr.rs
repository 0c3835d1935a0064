//! Condition expressions of device profiles (device-worker-ng extension, PROTOCOL.md §7):
//! `cpu > 80% || memory > 90%`, `temperature < 70`, `x < 3% || x == nil`.
//!
//! Why a hand-written grammar: the Go rewrite (`[ng] internal/configuration/interpreter`)
//! returned from its `&&` loop after the first operand, so `a && b && c` silently dropped `&& c`
//! (nothing checked for the end of input), treated `%`/`Gib` as decoration (`x > 23%` compared
//! against a bare 23), and panicked on missing variables. Here the whole input must be consumed,
//! units are part of a number's value and checked, and a missing variable has one defined meaning.
//!
//! Grammar (`&&` binds tighter than `||`; both are n-ary and evaluated left to right):
//!
//! ```text
//! expr       := and ( "||" and )*
//! and        := unary ( "&&" unary )*
//! unary      := "!" unary | "(" expr ")" | comparison
//! comparison := operand ( "<" | "<=" | ">" | ">=" | "==" | "!=" ) operand
//! operand    := variable | number | "nil"
//! variable   := [A-Za-z_][A-Za-z0-9_.]*          (except the keyword `nil`)
//! number     := "-"? digits ( "." digits )? unit?   (the unit directly after the digits)
//! unit       := "%" | "Ki" | "Mi" | "Gi" | "Ti" | "m"
//! ```
//!
//! Units: `%` is a percentage, `Ki/Mi/Gi/Ti` are bytes (powers of 1024), `m` is millicores,
//! no unit is a plain number. Two sides of a comparison must have the same unit. The native
//! variables `cpu`, `memory`, `disk` and `pids` are percentages of the device budget (what
//! the sampler measures against what workloads may use), so `cpu > 80` is rejected at parse
//! time: write `cpu > 80%`. Other variables are fed from outside with their own unit, which is
//! checked at evaluation ([`EvalError`]).
//!
//! Missing variables: any comparison involving a variable that has no value (or a value that is
//! not a finite number) is **false**, whatever the operator, including `!=`; `x == nil` is true
//! and `x != nil` false exactly when `x` is missing. So `!(x > 5)` is true when `x` is missing;
//! write `x != nil && x <= 5` to require a value.
//!
//! Limits: inputs longer than [`MAX_LEN`] bytes and nesting (parentheses and `!`) deeper than
//! [`MAX_DEPTH`] are parse errors, so neither parsing, evaluation, display nor drop can exhaust
//! the stack. Long `&&`/`||` chains are flat lists and cost no depth.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::str::FromStr;

/// Deepest nesting of parentheses and `!` accepted.
pub const MAX_DEPTH: usize = 64;
/// Longest expression accepted, in bytes.
pub const MAX_LEN: usize = 64 * 1024;

/// The variables the sampler provides natively, all percentages of the device budget.
pub const NATIVE_VARIABLES: [&str; 4] = ["cpu", "memory", "disk", "pids"];

/// The declared unit of a native variable (see [`NATIVE_VARIABLES`]); `None` for the others,
/// whose unit is only known when a value arrives.
pub fn native_unit(name: &str) -> Option<Unit> {
    NATIVE_VARIABLES.contains(&name).then_some(Unit::Percent)
}

/// What a number measures. Comparisons between different units are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// No unit: `70`, `-5.5`.
    Plain,
    /// `%`: a percentage (0–100 for the native variables).
    Percent,
    /// `Ki`, `Mi`, `Gi`, `Ti`: bytes.
    Bytes,
    /// `m`: thousandths of a CPU.
    Millicores,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Plain => "a plain number",
            Unit::Percent => "a percentage (%)",
            Unit::Bytes => "bytes (Ki, Mi, Gi, Ti)",
            Unit::Millicores => "millicores (m)",
        })
    }
}

/// A variable's or a literal's value: an amount in a unit (bytes are counted in bytes,
/// millicores in millicores, percentages in percent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Value {
    pub amount: f64,
    pub unit: Unit,
}

impl Value {
    pub const fn plain(amount: f64) -> Value {
        Value {
            amount,
            unit: Unit::Plain,
        }
    }
    pub const fn percent(amount: f64) -> Value {
        Value {
            amount,
            unit: Unit::Percent,
        }
    }
    pub fn bytes(bytes: u64) -> Value {
        Value {
            amount: bytes as f64,
            unit: Unit::Bytes,
        }
    }
    pub fn millicores(millicores: u64) -> Value {
        Value {
            amount: millicores as f64,
            unit: Unit::Millicores,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit {
            Unit::Plain => write!(f, "{}", Short(self.amount)),
            Unit::Percent => write!(f, "{}%", Short(self.amount)),
            Unit::Millicores => write!(f, "{}m", Short(self.amount)),
            Unit::Bytes => {
                for (suffix, size) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20)] {
                    if self.amount >= size as f64 {
                        return write!(f, "{:.1}{suffix}", self.amount / size as f64);
                    }
                }
                write!(f, "{}Ki", Short(self.amount / 1024.0))
            }
        }
    }
}

/// A measured amount as a person reads it: whole numbers as they are, others to one decimal
/// (a CPU share of 33.333333333333336 % is 33.3 %).
struct Short(f64);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.fract() == 0.0 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{:.1}", self.0)
        }
    }
}

/// Where an expression finds its variables' values. Implemented for closures
/// (`&dyn Fn(&str) -> Option<Value>` included) and for maps keyed by name.
pub trait Variables {
    fn value(&self, name: &str) -> Option<Value>;
}

impl<F> Variables for F
where
    F: Fn(&str) -> Option<Value> + ?Sized,
{
    fn value(&self, name: &str) -> Option<Value> {
        self(name)
    }
}

impl<K: Borrow<str> + Ord> Variables for BTreeMap<K, Value> {
    fn value(&self, name: &str) -> Option<Value> {
        self.get(name).copied()
    }
}

impl<K: Borrow<str> + Hash + Eq, S: BuildHasher> Variables for HashMap<K, Value, S> {
    fn value(&self, name: &str) -> Option<Value> {
        self.get(name).copied()
    }
}

// ---------------------------------------------------------------------------
// AST
// ---------------------------------------------------------------------------

/// A parsed condition. `Display` prints a canonical form that parses back to the same tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// At least two operands, evaluated left to right until one is true.
    Or(Vec<Expr>),
    /// At least two operands, evaluated left to right until one is false.
    And(Vec<Expr>),
    Not(Box<Expr>),
    Compare(Comparison),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub left: Operand,
    pub op: CmpOp,
    pub right: Operand,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Variable(String),
    Number(Literal),
    Nil,
}

/// A number as written (`80%`, `1.5Gi`) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Literal {
    pub value: Value,
    text: String,
}

impl Literal {
    /// The literal as written in the expression.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }

    fn apply(self, l: f64, r: f64) -> bool {
        match self {
            CmpOp::Lt => l < r,
            CmpOp::Le => l <= r,
            CmpOp::Gt => l > r,
            CmpOp::Ge => l >= r,
            CmpOp::Eq => l == r,
            CmpOp::Ne => l != r,
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Variable(name) => f.write_str(name),
            Operand::Number(lit) => f.write_str(&lit.text),
            Operand::Nil => f.write_str("nil"),
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.left, self.op, self.right)
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parentheses only where the tree needs them, so parse(display(e)) == e.
        fn list(f: &mut fmt::Formatter<'_>, items: &[Expr], sep: &str, and: bool) -> fmt::Result {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(sep)?;
                }
                let paren = matches!(item, Expr::Or(_)) || (and && matches!(item, Expr::And(_)));
                if paren {
                    write!(f, "({item})")?;
                } else {
                    write!(f, "{item}")?;
                }
            }
            Ok(())
        }
        match self {
            Expr::Or(items) => list(f, items, " || ", false),
            Expr::And(items) => list(f, items, " && ", true),
            Expr::Not(inner) => match **inner {
                Expr::Not(_) => write!(f, "!{inner}"),
                _ => write!(f, "!({inner})"),
            },
            Expr::Compare(c) => write!(f, "{c}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A parse error at a position: `offset` is the byte offset into the expression, `column` the
/// 1-based character column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: {kind}")]
pub struct ParseError {
    pub offset: usize,
    pub column: usize,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("expected {expected}, found {found}")]
    Unexpected {
        expected: &'static str,
        found: String,
    },
    #[error("unknown unit '{unit}' (use %, Ki, Mi, Gi, Ti or m, written right after the number)")]
    UnknownUnit { unit: String },
    #[error("malformed number '{text}': {why}")]
    BadNumber { text: String, why: &'static str },
    #[error("'{variable}' is {expected}, but '{literal}' is {found}")]
    UnitMismatch {
        variable: String,
        expected: Unit,
        literal: String,
        found: Unit,
    },
    #[error("'{left}' is {left_unit} and '{right}' is {right_unit}; they cannot be compared")]
    VariableUnitMismatch {
        left: String,
        left_unit: Unit,
        right: String,
        right_unit: Unit,
    },
    #[error("nil can only be compared to a variable with == or != (found '{op}')")]
    NilComparison { op: CmpOp },
    #[error("the comparison has no variable, so its value never changes")]
    ConstantComparison,
    #[error("nested more than {limit} levels deep (parentheses and '!')")]
    TooDeep { limit: usize },
    #[error("the expression is {len} bytes long; the limit is {limit}")]
    TooLong { len: usize, limit: usize },
}

/// Evaluation failed: a variable's value arrived in a unit the comparison cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("'{comparison}' compares {left} with {right}")]
pub struct EvalError {
    pub comparison: String,
    pub left: Unit,
    pub right: Unit,
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

impl Expr {
    /// Parses with the native variables' units ([`native_unit`]).
    pub fn parse(input: &str) -> Result<Expr, ParseError> {
        Expr::parse_with_units(input, &native_unit)
    }

    /// Parses, checking literals against `declared(name)`, the unit of each variable known in
    /// advance (`None`: checked only at evaluation).
    pub fn parse_with_units(
        input: &str,
        declared: &dyn Fn(&str) -> Option<Unit>,
    ) -> Result<Expr, ParseError> {
        if input.len() > MAX_LEN {
            return Err(ParseError {
                offset: 0,
                column: 1,
                kind: ParseErrorKind::TooLong {
                    len: input.len(),
                    limit: MAX_LEN,
                },
            });
        }
        let tokens = lex(input)?;
        let mut p = Parser {
            src: input,
            tokens,
            pos: 0,
            depth: 0,
            declared,
        };
        let expr = p.or()?;
        p.expect_end(TokenKind::Eof, "'&&', '||' or the end of the expression")?;
        Ok(expr)
    }

    /// The names of the variables the expression reads.
    pub fn variables(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        self.collect_variables(&mut out);
        out
    }

    fn collect_variables<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Expr::Or(items) | Expr::And(items) => {
                items.iter().for_each(|e| e.collect_variables(out));
            }
            Expr::Not(inner) => inner.collect_variables(out),
            Expr::Compare(c) => {
                for side in [&c.left, &c.right] {
                    if let Operand::Variable(name) = side {
                        out.insert(name);
                    }
                }
            }
        }
    }

    /// Evaluates with short-circuit: `||` stops at the first true operand, `&&` at the first
    /// false one, so an error in an operand that is not reached is not reported.
    pub fn eval<V: Variables + ?Sized>(&self, vars: &V) -> Result<bool, EvalError> {
        match self {
            Expr::Or(items) => {
                for item in items {
                    if item.eval(vars)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Expr::And(items) => {
                for item in items {
                    if !item.eval(vars)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Expr::Not(inner) => Ok(!inner.eval(vars)?),
            Expr::Compare(c) => c.eval(vars),
        }
    }
}

impl FromStr for Expr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Expr, ParseError> {
        Expr::parse(s)
    }
}

impl Comparison {
    fn eval<V: Variables + ?Sized>(&self, vars: &V) -> Result<bool, EvalError> {
        // A non-finite value (NaN from a broken feeder) counts as missing.
        let resolve = |o: &Operand| match o {
            Operand::Variable(name) => vars.value(name).filter(|v| v.amount.is_finite()),
            Operand::Number(lit) => Some(lit.value),
            Operand::Nil => None,
        };
        match (&self.left, &self.right) {
            (Operand::Nil, other) | (other, Operand::Nil) => {
                let missing = resolve(other).is_none();
                Ok(if self.op == CmpOp::Eq {
                    missing
                } else {
                    !missing
                })
            }
            _ => match (resolve(&self.left), resolve(&self.right)) {
                (Some(l), Some(r)) if l.unit == r.unit => Ok(self.op.apply(l.amount, r.amount)),
                (Some(l), Some(r)) => Err(EvalError {
                    comparison: self.to_string(),
                    left: l.unit,
                    right: r.unit,
                }),
                _ => Ok(false),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    Or,
    And,
    Not,
    LParen,
    RParen,
    Cmp(CmpOp),
    Number(Literal),
    Ident(String),
    Nil,
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    start: usize,
    end: usize,
}

fn column(src: &str, offset: usize) -> usize {
    src[..offset].chars().count() + 1
}

fn error(src: &str, offset: usize, kind: ParseErrorKind) -> ParseError {
    ParseError {
        offset,
        column: column(src, offset),
        kind,
    }
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let bytes = src.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let unexpected = |i: usize, expected: &'static str| {
        let c = src[i..].chars().next().unwrap_or(' ');
        error(
            src,
            i,
            ParseErrorKind::Unexpected {
                expected,
                found: format!("{c:?}"),
            },
        )
    };
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let two = bytes.get(i + 1).copied();
        let (kind, len) = match (b, two) {
            (b'|', Some(b'|')) => (TokenKind::Or, 2),
            (b'&', Some(b'&')) => (TokenKind::And, 2),
            (b'|', _) => return Err(unexpected(i, "'||'")),
            (b'&', _) => return Err(unexpected(i, "'&&'")),
            (b'<', Some(b'=')) => (TokenKind::Cmp(CmpOp::Le), 2),
            (b'>', Some(b'=')) => (TokenKind::Cmp(CmpOp::Ge), 2),
            (b'=', Some(b'=')) => (TokenKind::Cmp(CmpOp::Eq), 2),
            (b'!', Some(b'=')) => (TokenKind::Cmp(CmpOp::Ne), 2),
            (b'=', _) => return Err(unexpected(i, "'==' (a single '=' is not a comparison)")),
            (b'<', _) => (TokenKind::Cmp(CmpOp::Lt), 1),
            (b'>', _) => (TokenKind::Cmp(CmpOp::Gt), 1),
            (b'!', _) => (TokenKind::Not, 1),
            (b'(', _) => (TokenKind::LParen, 1),
            (b')', _) => (TokenKind::RParen, 1),
            (b'-', Some(d)) if d.is_ascii_digit() => lex_number(src, i)?,
            (d, _) if d.is_ascii_digit() => lex_number(src, i)?,
            (c, _) if c.is_ascii_alphabetic() || c == b'_' => {
                let len = bytes[i..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'.')
                    .count();
                let word = &src[i..i + len];
                let kind = if word == "nil" {
                    TokenKind::Nil
                } else {
                    TokenKind::Ident(word.to_string())
                };
                (kind, len)
            }
            _ => {
                return Err(unexpected(
                    i,
                    "a variable, a number, 'nil', an operator or a parenthesis",
                ))
            }
        };
        i += len;
        tokens.push(Token {
            kind,
            start,
            end: i,
        });
    }
    tokens.push(Token {
        kind: TokenKind::Eof,
        start: src.len(),
        end: src.len(),
    });
    Ok(tokens)
}

/// Lexes `-?digits(.digits)?unit?` starting at `start`; returns the token and its length.
fn lex_number(src: &str, start: usize) -> Result<(TokenKind, usize), ParseError> {
    let bytes = src.as_bytes();
    let mut i = start;
    if bytes[i] == b'-' {
        i += 1;
    }
    let digits = |from: usize| {
        bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    i += digits(i);
    if bytes.get(i) == Some(&b'.') {
        let frac = digits(i + 1);
        if frac == 0 {
            return Err(error(
                src,
                start,
                ParseErrorKind::BadNumber {
                    text: src[start..=i].to_string(),
                    why: "digits must follow the decimal point",
                },
            ));
        }
        i += 1 + frac;
    }
    let number_end = i;
    let (unit, factor, unit_len) = if bytes.get(i) == Some(&b'%') {
        (Unit::Percent, 1.0, 1)
    } else {
        let letters = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
            .count();
        match &src[i..i + letters] {
            "" => (Unit::Plain, 1.0, 0),
            "m" => (Unit::Millicores, 1.0, 1),
            "Ki" => (Unit::Bytes, 1024.0, 2),
            "Mi" => (Unit::Bytes, 1024.0 * 1024.0, 2),
            "Gi" => (Unit::Bytes, 1024.0f64.powi(3), 2),
            "Ti" => (Unit::Bytes, 1024.0f64.powi(4), 2),
            other => {
                return Err(error(
                    src,
                    i,
                    ParseErrorKind::UnknownUnit {
                        unit: other.to_string(),
                    },
                ))
            }
        }
    };
    let amount: f64 = src[start..number_end].parse().map_err(|_| {
        error(
            src,
            start,
            ParseErrorKind::BadNumber {
                text: src[start..number_end].to_string(),
                why: "not a decimal number",
            },
        )
    })?;
    let amount = amount * factor;
    let end = number_end + unit_len;
    if !amount.is_finite() {
        return Err(error(
            src,
            start,
            ParseErrorKind::BadNumber {
                text: src[start..end].to_string(),
                why: "too large",
            },
        ));
    }
    let literal = Literal {
        value: Value { amount, unit },
        text: src[start..end].to_string(),
    };
    Ok((TokenKind::Number(literal), end - start))
}

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
    declared: &'a dyn Fn(&str) -> Option<Unit>,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        // The token list always ends with Eof and the parser never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn bump(&mut self) -> Token {
        let t = self.peek().clone();
        if t.kind != TokenKind::Eof {
            self.pos += 1;
        }
        t
    }

    fn found(&self, t: &Token) -> String {
        match t.kind {
            TokenKind::Eof => "the end of the expression".to_string(),
            _ => format!("'{}'", &self.src[t.start..t.end]),
        }
    }

    fn unexpected(&self, expected: &'static str) -> ParseError {
        let t = self.peek();
        error(
            self.src,
            t.start,
            ParseErrorKind::Unexpected {
                expected,
                found: self.found(t),
            },
        )
    }

    fn expect_end(&mut self, kind: TokenKind, expected: &'static str) -> Result<(), ParseError> {
        if self.peek().kind == kind {
            self.bump();
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(error(
                self.src,
                self.peek().start,
                ParseErrorKind::TooDeep { limit: MAX_DEPTH },
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut items = vec![self.and()?];
        while self.peek().kind == TokenKind::Or {
            self.bump();
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Or(items)
        })
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut items = vec![self.unary()?];
        while self.peek().kind == TokenKind::And {
            self.bump();
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::And(items)
        })
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        match self.peek().kind {
            TokenKind::Not => {
                self.enter()?;
                self.bump();
                let inner = self.unary()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(inner)))
            }
            TokenKind::LParen => {
                self.enter()?;
                self.bump();
                let inner = self.or()?;
                self.expect_end(TokenKind::RParen, "'&&', '||' or ')'")?;
                self.depth -= 1;
                Ok(inner)
            }
            _ => self.comparison().map(Expr::Compare),
        }
    }

    fn operand(&mut self, expected: &'static str) -> Result<(Operand, usize), ParseError> {
        let t = self.peek().clone();
        let operand = match t.kind {
            TokenKind::Ident(name) => Operand::Variable(name),
            TokenKind::Number(lit) => Operand::Number(lit),
            TokenKind::Nil => Operand::Nil,
            _ => return Err(self.unexpected(expected)),
        };
        self.bump();
        Ok((operand, t.start))
    }

    fn comparison(&mut self) -> Result<Comparison, ParseError> {
        let (left, left_at) =
            self.operand("a comparison (a variable, a number or 'nil'), '!' or '('")?;
        let op = match self.peek().kind {
            TokenKind::Cmp(op) => op,
            _ => return Err(self.unexpected("a comparison operator (<, <=, >, >=, ==, !=)")),
        };
        let op_at = self.bump().start;
        let (right, right_at) = self.operand("a variable, a number or 'nil'")?;
        self.check(&left, left_at, op, op_at, &right, right_at)?;
        Ok(Comparison { left, op, right })
    }

    /// Rejects comparisons whose value is fixed or whose units cannot agree.
    fn check(
        &self,
        left: &Operand,
        left_at: usize,
        op: CmpOp,
        op_at: usize,
        right: &Operand,
        right_at: usize,
    ) -> Result<(), ParseError> {
        use Operand::{Nil, Number, Variable};
        let err = |at, kind| Err(error(self.src, at, kind));
        match (left, right) {
            (Nil, Variable(_)) | (Variable(_), Nil) if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
                Ok(())
            }
            (Nil, Nil) | (Nil, Number(_)) | (Number(_), Nil)
                if matches!(op, CmpOp::Eq | CmpOp::Ne) =>
            {
                err(left_at, ParseErrorKind::ConstantComparison)
            }
            (Nil, _) | (_, Nil) => err(op_at, ParseErrorKind::NilComparison { op }),
            (Number(_), Number(_)) => err(left_at, ParseErrorKind::ConstantComparison),
            (Variable(v), Number(lit)) | (Number(lit), Variable(v)) => {
                let lit_at = if matches!(left, Number(_)) {
                    left_at
                } else {
                    right_at
                };
                match (self.declared)(v) {
                    Some(unit) if unit != lit.value.unit => err(
                        lit_at,
                        ParseErrorKind::UnitMismatch {
                            variable: v.clone(),
                            expected: unit,
                            literal: lit.text.clone(),
                            found: lit.value.unit,
                        },
                    ),
                    _ => Ok(()),
                }
            }
            (Variable(l), Variable(r)) => match ((self.declared)(l), (self.declared)(r)) {
                (Some(lu), Some(ru)) if lu != ru => err(
                    left_at,
                    ParseErrorKind::VariableUnitMismatch {
                        left: l.clone(),
                        left_unit: lu,
                        right: r.clone(),
                        right_unit: ru,
                    },
                ),
                _ => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_show_as_a_person_reads_them() {
        assert_eq!(Value::percent(100.0 / 3.0).to_string(), "33.3%");
        assert_eq!(Value::percent(50.0).to_string(), "50%");
        assert_eq!(Value::millicores(250).to_string(), "250m");
        assert_eq!(Value::bytes(3 << 20).to_string(), "3.0Mi");
        assert_eq!(Value::bytes(1536).to_string(), "1.5Ki");
    }

    fn vars(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn p(v: f64) -> Value {
        Value::percent(v)
    }
    fn n(v: f64) -> Value {
        Value::plain(v)
    }

    /// (expression, variables, expected value)
    #[test]
    fn valid_expressions_table() {
        type Case = (&'static str, Vec<(&'static str, Value)>, bool);
        let cases: Vec<Case> = vec![
            ("cpu > 80%", vec![("cpu", p(90.0))], true),
            ("cpu > 80%", vec![("cpu", p(80.0))], false),
            ("cpu >= 80%", vec![("cpu", p(80.0))], true),
            ("80% < cpu", vec![("cpu", p(90.0))], true),
            ("80% < cpu", vec![("cpu", p(70.0))], false),
            ("80% >= cpu", vec![("cpu", p(80.0))], true),
            ("cpu>25%", vec![("cpu", p(25.5))], true),
            ("cpu<=25%", vec![("cpu", p(25.0))], true),
            ("cpu == 25%", vec![("cpu", p(25.0))], true),
            ("cpu != 25%", vec![("cpu", p(25.0))], false),
            ("temperature < 70", vec![("temperature", n(69.9))], true),
            ("temperature < 70", vec![("temperature", n(70.0))], false),
            ("temperature > -5", vec![("temperature", n(-4.0))], true),
            ("temperature > -5.5", vec![("temperature", n(-6.0))], false),
            // Go rewrite: `x > 23%` compared with a bare 23; here units are values.
            ("x > 23%", vec![("x", p(24.0))], true),
            ("x > 23%", vec![("x", p(22.0))], false),
            // Go rewrite: the third operand of `&&` was dropped.
            (
                "a > 1 && b > 1 && c > 1",
                vec![("a", n(2.0)), ("b", n(2.0)), ("c", n(0.0))],
                false,
            ),
            (
                "a > 1 && b > 1 && c > 1",
                vec![("a", n(2.0)), ("b", n(2.0)), ("c", n(2.0))],
                true,
            ),
            (
                "a > 1 || b > 1 || c > 1",
                vec![("a", n(0.0)), ("b", n(0.0)), ("c", n(2.0))],
                true,
            ),
            (
                "a > 1 || b > 1 || c > 1",
                vec![("a", n(0.0)), ("b", n(0.0)), ("c", n(0.0))],
                false,
            ),
            // && binds tighter than ||
            (
                "x == 2 && y == 1 || z == 1",
                vec![("x", n(2.0)), ("y", n(0.0)), ("z", n(1.0))],
                true,
            ),
            (
                "z == 1 || x == 2 && y == 1",
                vec![("x", n(2.0)), ("y", n(0.0)), ("z", n(0.0))],
                false,
            ),
            (
                "(z == 1 || x == 2) && y == 1",
                vec![("x", n(2.0)), ("y", n(0.0)), ("z", n(1.0))],
                false,
            ),
            ("!(cpu > 50%)", vec![("cpu", p(10.0))], true),
            ("!cpu > 50%", vec![("cpu", p(10.0))], true),
            ("!!(cpu > 50%)", vec![("cpu", p(10.0))], false),
            (
                "! ( cpu > 50% ) && memory < 10%",
                vec![("cpu", p(10.0)), ("memory", p(5.0))],
                true,
            ),
            // missing variables: every comparison is false, == nil is true
            ("x > 5", vec![], false),
            ("x <= 5", vec![], false),
            ("x != 5", vec![], false),
            ("x == 5", vec![], false),
            ("!(x > 5)", vec![], true),
            ("x == nil", vec![], true),
            ("nil == x", vec![], true),
            ("x != nil", vec![], false),
            ("x == nil", vec![("x", n(0.0))], false),
            ("x != nil", vec![("x", n(0.0))], true),
            ("x<3% || x == nil", vec![], true),
            ("x<3% || x == nil", vec![("x", p(2.0))], true),
            ("x<3% || x == nil", vec![("x", p(4.0))], false),
            ("x != nil && x <= 5", vec![], false),
            (
                "a > 1 && b > 1 && c > 1",
                vec![("a", n(2.0)), ("b", n(2.0))],
                false,
            ),
            ("x > y", vec![("x", n(2.0))], false),
            ("x > y", vec![("x", n(2.0)), ("y", n(1.0))], true),
            (
                "cpu > memory",
                vec![("cpu", p(2.0)), ("memory", p(1.0))],
                true,
            ),
            // units
            (
                "mem_bytes > 1Gi",
                vec![("mem_bytes", Value::bytes(2 << 30))],
                true,
            ),
            (
                "mem_bytes > 1.5Gi",
                vec![("mem_bytes", Value::bytes(3 << 29))],
                false,
            ),
            (
                "mem_bytes >= 1536Mi",
                vec![("mem_bytes", Value::bytes(3 << 29))],
                true,
            ),
            (
                "mem_bytes < 4Ki",
                vec![("mem_bytes", Value::bytes(4095))],
                true,
            ),
            (
                "mem_bytes < 1Ti",
                vec![("mem_bytes", Value::bytes(1 << 39))],
                true,
            ),
            (
                "cores > 250m",
                vec![("cores", Value::millicores(500))],
                true,
            ),
            // whitespace
            ("  \t cpu\n>\r\n80%  ", vec![("cpu", p(81.0))], true),
            ("sensor.temp_1 > 3", vec![("sensor.temp_1", n(4.0))], true),
            // NaN counts as missing
            ("x != 1", vec![("x", n(f64::NAN))], false),
            ("x == nil", vec![("x", n(f64::NAN))], true),
        ];
        for (src, vs, want) in cases {
            let e = Expr::parse(src).unwrap_or_else(|err| panic!("{src:?}: {err}"));
            let got = e
                .eval(&vars(&vs))
                .unwrap_or_else(|err| panic!("{src:?}: {err}"));
            assert_eq!(got, want, "{src:?} with {vs:?} (parsed as {e})");
            // Display round-trips.
            let again = Expr::parse(&e.to_string()).unwrap();
            assert_eq!(again, e, "{src:?} displayed as {e}");
        }
    }

    /// (expression, byte offset of the error, a fragment of the message)
    #[test]
    fn invalid_expressions_table() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "expected a comparison"),
            ("   ", 3, "found the end of the expression"),
            ("cpu", 3, "expected a comparison operator"),
            (
                "cpu >",
                5,
                "expected a variable, a number or 'nil', found the end",
            ),
            ("cpu > 80% &&", 12, "expected a comparison"),
            ("cpu > 80% && && x > 1", 13, "found '&&'"),
            ("a > 1 && b > 1 && c", 19, "expected a comparison operator"),
            (
                "cpu > 80% memory > 2%",
                10,
                "expected '&&', '||' or the end of the expression, found 'memory'",
            ),
            ("cpu > 80%)", 9, "found ')'"),
            ("(cpu > 80%", 10, "expected '&&', '||' or ')'"),
            ("((cpu > 80%)", 12, "expected '&&', '||' or ')'"),
            ("()", 1, "found ')'"),
            ("cpu = 80%", 4, "'=='"),
            ("cpu > 80% & x > 1", 10, "'&&'"),
            ("cpu > 80% | x > 1", 10, "'||'"),
            ("cpu > 80 %", 9, "found '%'"),
            ("1 < x < 3", 6, "expected '&&', '||' or the end"),
            (
                "cpu > 80",
                6,
                "'cpu' is a percentage (%), but '80' is a plain number",
            ),
            (
                "80 < cpu",
                0,
                "'cpu' is a percentage (%), but '80' is a plain number",
            ),
            ("memory > 1Gi", 9, "but '1Gi' is bytes"),
            ("cpu > 500m", 6, "is millicores"),
            ("cpu > 80% && memory < 1Gi", 22, "'memory' is a percentage"),
            ("x > 5GB", 5, "unknown unit 'GB'"),
            ("x > 5Gib", 5, "unknown unit 'Gib'"),
            ("x > 5M", 5, "unknown unit 'M'"),
            ("x > 5.", 4, "digits must follow the decimal point"),
            ("x > .5", 4, "found '.'"),
            ("x > -", 4, "found '-'"),
            ("x < nil", 2, "nil can only be compared"),
            ("nil >= x", 4, "nil can only be compared"),
            ("nil == nil", 0, "no variable"),
            ("nil == 3", 0, "no variable"),
            ("3 > 2", 0, "no variable"),
            ("x == y == z", 7, "expected '&&', '||' or the end"),
            ("cpu > 80% || €", 13, "found '€'"),
            ("température > 3", 4, "found 'é'"),
            ("x > 3 ☃☃", 6, "found '☃'"),
            ("\u{0}", 0, "found '\\0'"),
            ("x > 1e3", 5, "unknown unit 'e3'"),
        ];
        for (src, offset, fragment) in cases {
            let err = Expr::parse(src).expect_err(src);
            let msg = err.to_string();
            assert_eq!(err.offset, *offset, "{src:?}: {msg}");
            assert!(
                msg.contains(fragment),
                "{src:?}: {msg:?} lacks {fragment:?}"
            );
            assert_eq!(err.column, src[..err.offset].chars().count() + 1);
        }
    }

    #[test]
    fn error_names_column_and_expectation() {
        let err = Expr::parse("température > 3 &&").unwrap_err();
        assert_eq!((err.offset, err.column), (4, 5));
        let err = Expr::parse(&format!("x > {}Ti", "9".repeat(400))).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let err = Expr::parse("é > 3 && ").unwrap_err();
        assert_eq!(err.offset, 0);
        let err = Expr::parse("ab > 3 && €").unwrap_err();
        assert_eq!((err.offset, err.column), (10, 11));
        assert_eq!(
            err.to_string(),
            "at column 11: expected a variable, a number, 'nil', an operator or a parenthesis, found '€'"
        );
        let err = Expr::parse("cpu > 80").unwrap_err();
        assert_eq!(
            err.to_string(),
            "at column 7: 'cpu' is a percentage (%), but '80' is a plain number"
        );
    }

    #[test]
    fn and_chains_keep_every_operand() {
        let e = Expr::parse("a > 1 && b > 1 && c > 1").unwrap();
        assert_eq!(
            e.variables().into_iter().collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        match &e {
            Expr::And(items) => assert_eq!(items.len(), 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(e.to_string(), "a > 1 && b > 1 && c > 1");
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for (src, canonical) in [
            ("cpu>25%", "cpu > 25%"),
            ("(a>1)", "a > 1"),
            ("((a>1 && b>1)) || c>1", "a > 1 && b > 1 || c > 1"),
            ("a>1 && (b>1 || c>1)", "a > 1 && (b > 1 || c > 1)"),
            ("(a>1 && b>1) && c>1", "(a > 1 && b > 1) && c > 1"),
            ("(a>1 || b>1) || c>1", "(a > 1 || b > 1) || c > 1"),
            ("!a>1", "!(a > 1)"),
            ("!!!(a>1||b>1)", "!!!(a > 1 || b > 1)"),
            ("80%<cpu", "80% < cpu"),
            ("x==nil", "x == nil"),
            ("m > 1.50Gi", "m > 1.50Gi"),
        ] {
            let e = Expr::parse(src).unwrap();
            assert_eq!(e.to_string(), canonical, "{src}");
            assert_eq!(Expr::parse(canonical).unwrap(), e, "{src}");
        }
    }

    #[test]
    fn short_circuit_skips_unit_errors_it_does_not_reach() {
        let vs = vars(&[("x", n(1.0)), ("y", p(5.0))]);
        // y is fed as a percentage but compared with a plain number: an error when reached.
        let err = Expr::parse("y > 3").unwrap().eval(&vs).unwrap_err();
        assert_eq!(
            err.to_string(),
            "'y > 3' compares a percentage (%) with a plain number"
        );
        assert_eq!(Expr::parse("x == 1 || y > 3").unwrap().eval(&vs), Ok(true));
        assert_eq!(Expr::parse("x == 2 && y > 3").unwrap().eval(&vs), Ok(false));
        assert!(Expr::parse("x == 1 && y > 3").unwrap().eval(&vs).is_err());
        // and the lookup is not even called for unreached operands
        let calls = std::cell::Cell::new(0);
        let lookup = |name: &str| {
            calls.set(calls.get() + 1);
            (name == "a").then_some(n(1.0))
        };
        let e = Expr::parse("a == 1 || b == 1 || c == 1").unwrap();
        assert_eq!(e.eval(&lookup), Ok(true));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn percent_literal_is_not_a_bare_number() {
        // The Go rewrite compared `x > 23%` with a bare 23; here a plain 24 does not satisfy it.
        let e = Expr::parse("x > 23%").unwrap();
        let err = e.eval(&vars(&[("x", n(24.0))])).unwrap_err();
        assert_eq!((err.left, err.right), (Unit::Plain, Unit::Percent));
        assert_eq!(e.eval(&vars(&[("x", p(24.0))])), Ok(true));
        let e = Expr::parse("x > 1Gi").unwrap();
        assert_eq!(
            e.eval(&vars(&[("x", Value::bytes((1 << 30) + 1))])),
            Ok(true)
        );
        assert!(e.eval(&vars(&[("x", n(2.0))])).is_err());
    }

    #[test]
    fn lookups_by_closure_dyn_fn_and_maps() {
        let e = Expr::parse("cpu > 50% && t < 70").unwrap();
        let f = |name: &str| match name {
            "cpu" => Some(p(60.0)),
            "t" => Some(n(20.0)),
            _ => None,
        };
        let dynf: &dyn Fn(&str) -> Option<Value> = &f;
        assert_eq!(e.eval(dynf), Ok(true));
        assert_eq!(e.eval(&f), Ok(true));
        let hm: HashMap<&str, Value> = [("cpu", p(60.0)), ("t", n(80.0))].into_iter().collect();
        assert_eq!(e.eval(&hm), Ok(false));
        let bm: BTreeMap<&str, Value> = [("cpu", p(60.0)), ("t", n(20.0))].into_iter().collect();
        assert_eq!(e.eval(&bm), Ok(true));
    }

    #[test]
    fn custom_declared_units() {
        let declared = |name: &str| (name == "temperature").then_some(Unit::Plain);
        assert!(Expr::parse_with_units("temperature > 70", &declared).is_ok());
        let err = Expr::parse_with_units("temperature > 70%", &declared).unwrap_err();
        assert!(
            matches!(err.kind, ParseErrorKind::UnitMismatch { .. }),
            "{err}"
        );
        // cpu is not declared by this table, so it is checked at evaluation only
        assert!(Expr::parse_with_units("cpu > 70", &declared).is_ok());
        let e = Expr::parse("cpu > temperature && 1 < x").unwrap();
        assert_eq!(e.variables().len(), 3);
        let declared2 = |name: &str| match name {
            "temperature" => Some(Unit::Plain),
            _ => native_unit(name),
        };
        let err = Expr::parse_with_units("cpu > temperature", &declared2).unwrap_err();
        assert!(
            matches!(err.kind, ParseErrorKind::VariableUnitMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}x > 1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(Expr::parse(&ok).is_ok());
        let deep = format!(
            "{}x > 1{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        );
        let err = Expr::parse(&deep).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::TooDeep { limit: MAX_DEPTH });
        assert_eq!(err.offset, MAX_DEPTH);
        let nots = format!("{}x > 1", "!".repeat(MAX_DEPTH + 1));
        assert!(matches!(
            Expr::parse(&nots).unwrap_err().kind,
            ParseErrorKind::TooDeep { .. }
        ));
        let mixed = "!(".repeat(MAX_DEPTH) + "x > 1" + &")".repeat(MAX_DEPTH);
        assert!(matches!(
            Expr::parse(&mixed).unwrap_err().kind,
            ParseErrorKind::TooDeep { .. }
        ));
        // far beyond any stack: rejected at the limit, never recursing further
        let huge = "(".repeat(MAX_LEN - 10) + "x>1";
        assert!(matches!(
            Expr::parse(&huge).unwrap_err().kind,
            ParseErrorKind::TooDeep { .. }
        ));
        let huge_not = "!".repeat(MAX_LEN);
        assert!(matches!(
            Expr::parse(&huge_not).unwrap_err().kind,
            ParseErrorKind::TooDeep { .. }
        ));
    }

    #[test]
    fn huge_inputs() {
        // A long flat chain is fine: it is a list, not a deep tree.
        let terms: Vec<String> = (0..3000).map(|i| format!("v{i} > {i}")).collect();
        let chain = terms.join(" && ");
        assert!(chain.len() < MAX_LEN);
        let e = Expr::parse(&chain).unwrap();
        let all = |_: &str| Some(n(1e9));
        assert_eq!(e.eval(&all), Ok(true));
        assert_eq!(e.variables().len(), 3000);
        assert_eq!(Expr::parse(&e.to_string()).unwrap(), e);
        let mixed = terms.join(" || ");
        assert_eq!(
            Expr::parse(&mixed).unwrap().eval(&|_: &str| None),
            Ok(false)
        );
        // Beyond the length limit: rejected before lexing.
        let too_long = format!("x > 1{}", " ".repeat(MAX_LEN));
        let err = Expr::parse(&too_long).unwrap_err();
        assert!(matches!(err.kind, ParseErrorKind::TooLong { .. }), "{err}");
        // A long identifier and garbage of every kind never panic.
        assert!(Expr::parse(&format!("{} > 1", "a".repeat(MAX_LEN - 4))).is_ok());
        for garbage in [
            "\u{feff}x > 1",
            "x\u{200b} > 1",
            "🦀 && 🦀",
            "x > 1\u{0301}",
            "ｘ > 1",
            "\\x > 1",
        ] {
            let err = Expr::parse(garbage).unwrap_err();
            assert!(garbage.is_char_boundary(err.offset), "{garbage:?}");
        }
    }

    #[test]
    fn value_display() {
        assert_eq!(p(25.5).to_string(), "25.5%");
        assert_eq!(Value::bytes(3 << 29).to_string(), "1.5Gi");
        assert_eq!(Value::bytes(2048).to_string(), "2Ki");
        assert_eq!(Value::millicores(250).to_string(), "250m");
        assert_eq!(n(-3.0).to_string(), "-3");
    }
}
