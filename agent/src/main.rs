fn main() {
    println!("{}", backplane::DATAPATH_OBJECT.len());
}
